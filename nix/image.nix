# The embassy appliance: a NixOS disk image whose software the TPM can vouch for.
#
# Measured boot path (see docs/adr/0007-measured-boot-expectations.md):
#   firmware --(PCR 4: the UKI's Authenticode digest; the kernel too with stubs < 258)--> UKI at
#   \EFI\BOOT\BOOTX64.EFI, started directly by the firmware (removable-media path, no boot
#   loader, no boot menu) --(PCR 11: every UKI section, the command line among them, which
#   carries usrhash=, the dm-verity root hash of the Nix store)--> initrd --> system.
# So PCR 4 and PCR 11 pin the whole closure: kernel, initrd, command line and, through the
# root hash, every file in /nix/store, the embassy and its config file included.
# PCR 12 must stay all zeros: nothing on the ESP but the UKI (no credentials, no add-ons,
# no system extensions), and firmware passes no command line to a removable-media boot
# entry. nixpkgs' verity-store module puts the UKI at /EFI/Linux/ for systemd-boot by
# default; it also supports the direct path (its test appliance-repart-image-verity-store
# boots it that way), which keeps a boot loader and its menu out of PCR 4 and its editor out
# of the command line.
{
  config,
  lib,
  pkgs,
  modulesPath,
  ...
}:
let
  efiArch = pkgs.stdenv.hostPlatform.efiArch;
  inherit (config.image.repart.verityStore) partitionIds;
  embassySettings = config.services.embassy.settings;
in
{
  imports = [
    (modulesPath + "/image/repart.nix")
    ./module.nix
    ./hardening.nix
  ];

  system.image = {
    id = "embassy";
    version = "1";
  };
  system.stateVersion = "26.05";

  # ---- the embassy --------------------------------------------------------------------------
  services.embassy = {
    enable = true;
    # The kernel's TPM resource manager: the daemon's transient objects are isolated from
    # every other TPM user and flushed if it dies.
    settings.tpm.device = "/dev/tpmrm0";
    # The workload comes from runtime metadata chosen per deployment (nix/README.md): set
    # workloadMetadata.source to "file" (a config partition) or "url" (a cloud metadata
    # server). The choice of source is part of the config, and so of the measurement; the
    # workload it names is logged as launch events, not measured.
    workloadMetadata.source = lib.mkDefault "none";
  };
  security.tpm2 = {
    enable = true;
    # The kernel resource manager (/dev/tpmrm0), not the userspace tpm2-abrmd daemon.
    abrmd.enable = false;
  };
  # tpm2-tools on the system for the operator's offline checks of the event log, and for
  # `tpm2_checkquote` users who want the same tool the verifier docs name.
  environment.systemPackages = [ pkgs.tpm2-tools ];
  virtualisation.docker = {
    enable = true;
    # overlay2 on the ext4 /var partition.
    storageDriver = "overlay2";
  };

  # ---- boot: a UKI started by the firmware -----------------------------------------------------
  boot.loader.grub.enable = false;
  boot.loader.systemd-boot.enable = false;
  boot.initrd.systemd.enable = true;
  boot.uki.name = "embassy";
  # systemd-stub measures the UKI into PCR 11; systemd's pcrphase units (installed by
  # nixpkgs' systemd TPM2 support since 26.05) add the boot phases up to "ready", which the
  # expected.json model includes. Both are the defaults with a TPM-enabled systemd; stated
  # here because the expected PCR 11 depends on them.
  systemd.tpm2.enable = true;
  boot.initrd.systemd.tpm2.enable = true;
  boot.kernelParams = [
    "console=ttyS0,115200n8"
    # A store block that fails verification stops the machine instead of returning EIO to
    # whichever program read it.
    "systemd.verity_usr_options=panic-on-corruption"
  ];
  boot.initrd.availableKernelModules = [
    "virtio_pci"
    "virtio_blk"
    "virtio_scsi"
    "nvme"
    "ahci"
    "sd_mod"
  ];

  # ---- disk layout ------------------------------------------------------------------------------
  # GPT: ESP (the UKI only), the store's dm-verity hash partition, the store (erofs). Built
  # by systemd-repart in the Nix build (nixpkgs' image.repart); the UKI is made after the
  # store, with the store's root hash on its command line (image.repart.verityStore).
  image.repart = {
    name = "embassy";
    verityStore = {
      enable = true;
      ukiPath = "/EFI/BOOT/BOOT${lib.toUpper efiArch}.EFI";
    };
    partitions = {
      ${partitionIds.esp}.repartConfig = {
        Type = "esp";
        Format = "vfat";
        SizeMinBytes = "96M";
      };
      ${partitionIds.store-verity}.repartConfig.Minimize = "best";
      ${partitionIds.store}.repartConfig.Minimize = "best";
    };
  };

  # Root is a tmpfs (nothing of a previous boot survives there), the store is the verity
  # device systemd sets up from usrhash= and mounts at /usr, and /var is the one persistent,
  # writable partition: Docker's images and containers, the embassy's state and logs.
  fileSystems = {
    "/" = {
      fsType = "tmpfs";
      options = [
        "mode=0755"
        "size=50%"
      ];
    };
    "/nix/store" = {
      device = "/usr/nix/store";
      fsType = "none";
      options = [ "bind" ];
    };
    "/var" = {
      device = "/dev/disk/by-partlabel/var";
      fsType = "ext4";
    };
  };
  # /var is created on first boot, in the initrd, in the free space after the store: the
  # image stays small and the same for every disk size. systemd-repart has to be told the
  # disk because / is a tmpfs; /dev/vda is QEMU's and most KVM clouds' virtio disk, other
  # platforms override it (e.g. /dev/nvme0n1). It only changes the initrd, so it changes
  # PCR 11: one expected.json per platform.
  boot.initrd.systemd.repart = {
    enable = true;
    device = lib.mkDefault "/dev/vda";
  };
  systemd.repart.partitions."30-var" = {
    # linux-generic, not "var": a var-typed partition would also be picked up by
    # systemd-gpt-auto-generator; this one is mounted by its label only.
    Type = "linux-generic";
    Label = "var";
    Format = "ext4";
    SizeMinBytes = "8G";
  };

  # /etc is an immutable overlay built with the system, and users come from userborn: no
  # Perl activation writes to /etc at boot.
  system.etc.overlay = {
    enable = true;
    mutable = false;
  };
  services.userborn.enable = true;
  # /usr is the read-only store partition, so there is no /usr/bin/env to create.
  system.activationScripts.usrbinenv = lib.mkForce "";

  networking.hostName = "embassy";
  networking.useNetworkd = true;
  # resolved owns /etc/resolv.conf through a symlink, which an immutable /etc needs.
  services.resolved.enable = true;
  # No process listens on the network (no sshd, and the embassy has none); the firewall
  # refuses any inbound connection that is not Docker's published workload ports.
  networking.firewall.enable = true;
  time.timeZone = "UTC";

  assertions = [
    {
      # systemd extends PCR 15 with the machine id and file systems it mounts; the embassy's
      # own PCRs must be ones nothing else in the image extends.
      assertion =
        !(lib.elem 15 [
          embassySettings.pcrs.embassy
          embassySettings.pcrs.log
        ]);
      message = "services.embassy.settings.pcrs: PCR 15 is extended by systemd in this image; use 13 and 14.";
    }
    {
      assertion = lib.all (pcr: lib.elem pcr embassySettings.pcrs.boot) [
        4
        11
        12
      ];
      message = "services.embassy.settings.pcrs.boot must include 4, 11 and 12: they are what proves this image.";
    }
  ];
}
