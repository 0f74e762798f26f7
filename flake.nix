# The embassy's Nix entry point; the logic is in nix/ (see nix/README.md).
# Needs Nix >= 2.18 (the pinned nixpkgs does not evaluate with older Nix).
#
#   nix build .#image     the disk image, its UKI, the embassy config and expected.json
#   nix build .#embassy   the daemon package (its unit tests run in the build)
{
  description = "embassy: a TPM-attested sealed-computation daemon and its measured NixOS image";

  # A stable NixOS release, pinned by flake.lock.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";

  outputs =
    { self, nixpkgs }:
    let
      # The image is x86_64 (UEFI, \EFI\BOOT\BOOTX64.EFI); the package builds wherever
      # nixpkgs' Python does, but only this system is checked.
      system = "x86_64-linux";
      pkgs = nixpkgs.legacyPackages.${system};
      embassy = pkgs.callPackage ./nix/package.nix { };
      image = nixpkgs.lib.nixosSystem {
        modules = [
          { nixpkgs.hostPlatform = system; }
          ./nix/image.nix
        ];
      };
    in
    {
      packages.${system} = {
        inherit embassy;
        default = embassy;
        image = pkgs.callPackage ./nix/expected.nix { nixos = image; };
        uki = image.config.system.build.uki;
      };

      nixosModules = {
        embassy = ./nix/module.nix;
        hardening = ./nix/hardening.nix;
        image = ./nix/image.nix;
        default = self.nixosModules.embassy;
      };

      nixosConfigurations.embassy-image = image;

      checks.${system}.embassy = embassy;
    };
}
