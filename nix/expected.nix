# The image build's output directory: the disk image, the UKI, the embassy's config file
# (embassy.json) and expected.json, what a verifier pins (`embassy verify --expected`).
#
# expected.json is computed by the image's own embassy (`embassy measure --config --uki`):
# the UKI's SHA-256 and Authenticode digest, the PCRs 4, 11 and 12 a boot of it produces,
# and the embassy measurement (the installed package's files, the config, the authorities).
# Running it here also validates the rendered config with the daemon's own parser: a value
# the Nix types let through but the daemon refuses fails the build, not the boot.
{
  runCommand,
  # The evaluated NixOS system of nix/image.nix.
  nixos,
}:
let
  inherit (nixos.config.system.build) finalImage uki embassyConfig;
  inherit (nixos.config.image.repart) imageFile;
  inherit (nixos.config.system.boot.loader) ukiFile;
  embassy = nixos.config.services.embassy.package;
in
runCommand "embassy-image-${nixos.config.system.image.version}"
  {
    nativeBuildInputs = [ embassy ];
    passthru = { inherit nixos; };
    meta.description = "The embassy disk image with its UKI, config and expected.json";
  }
  ''
    mkdir -p $out
    embassy measure --config ${embassyConfig} --uki ${uki}/${ukiFile} > expected.json
    install -m 0444 expected.json $out/expected.json
    ln -s ${finalImage}/${imageFile} $out/${imageFile}
    ln -s ${finalImage}/repart-output.json $out/repart-output.json
    ln -s ${uki}/${ukiFile} $out/${ukiFile}
    ln -s ${embassyConfig} $out/embassy.json
  ''
