# services.embassy: the embassy daemon as a NixOS service (see nix/README.md).
#
# The daemon's config file is rendered from `services.embassy.settings`, whose options are
# generated from the daemon's own schema (nix/settings-options.nix), so a key means the same
# here as in docs/config.md. The workload is chosen at boot from runtime metadata
# (`workloadMetadata`), never from the kernel command line: the command line is fixed inside
# the UKI and measured into PCR 11, and a boot-time override would be measured into PCR 12,
# which the verifier requires to stay all zeros.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.services.embassy;
  meta = cfg.workloadMetadata;
  inherit (lib)
    mkOption
    mkEnableOption
    mkIf
    mkMerge
    types
    ;

  settingsOptions = import ./settings-options.nix { inherit lib; };

  # The oneshot that fetches the metadata writes here (its RuntimeDirectory, owned by root
  # and 0700, so only the embassy, which runs as root, reads the workload it names).
  fetchedMetadata = "/run/embassy-metadata/workload.json";
  metadataFile =
    if meta.source == "file" then
      meta.file
    else if meta.source == "url" then
      fetchedMetadata
    else
      null;

  # The config file exactly as `embassy serve` reads it: JSON (which is YAML), with unset
  # (null) keys left out so the daemon applies its own defaults, and without the module
  # system's bookkeeping.
  clean =
    value:
    if builtins.isAttrs value then
      lib.mapAttrs (_: clean) (lib.filterAttrs (name: v: v != null && name != "_module") value)
    else if builtins.isList value then
      map clean value
    else
      value;
  configFile = pkgs.writeText "embassy-config.json" (builtins.toJSON (clean cfg.settings));

  # One argument of a systemd command line, passed to the program byte for byte: quoted,
  # with systemd's specifier (%) and variable ($) characters doubled. No shell is involved.
  execArg =
    arg:
    "\""
    + lib.replaceStrings [ "\\" "\"" "%" "$" ] [ "\\\\" "\\\"" "%%" "$$" ] (toString arg)
    + "\"";
  execLine = argv: lib.concatStringsSep " " (map execArg argv);

  tpmDevice = cfg.settings.tpm.device;
  # systemd's device unit for the TPM; the assertion below keeps the path to characters
  # that need no escaping in a unit name.
  tpmDeviceUnit = lib.replaceStrings [ "/" ] [ "-" ] (lib.removePrefix "/" tpmDevice) + ".device";

  socketDir = dirOf cfg.settings.socket;
  dataDir = cfg.settings.data_dir;

  curlArgv = [
    "${pkgs.curl}/bin/curl"
    "--disable" # first: never read a .curlrc
    "--fail"
    "--silent"
    "--show-error"
    "--proto"
    "=http,https" # metadata servers speak plain HTTP on a link-local address
    "--noproxy"
    "*" # the metadata server is on-link; a proxy would see the request
    "--connect-timeout"
    (toString meta.timeoutSeconds)
    "--max-time"
    (toString meta.timeoutSeconds)
    "--retry"
    "5"
    "--retry-connrefused" # the metadata endpoint can come up after the network does
    "--retry-delay"
    "2"
    "--max-filesize"
    "1048576" # a workload section is a few hundred bytes
    "--output"
    "${fetchedMetadata}.part"
  ]
  ++ lib.concatMap (name: [
    "--header"
    "${name}: ${meta.headers.${name}}"
  ]) (lib.attrNames meta.headers)
  ++ [
    "--url"
    meta.url
  ];

  noControlChars = text: builtins.match "[^\r\n]*" text != null;
  headerNameOk = name: builtins.match "[A-Za-z0-9-]+" name != null;

  dockerCli = "${config.virtualisation.docker.package or pkgs.docker}/bin/docker";
  loadsImages = cfg.workloadImages != [ ];
  fetchesMetadata = meta.source == "url";

  # The sandbox every unit here shares; each unit adds what it alone needs.
  baseSandbox = {
    NoNewPrivileges = true;
    ProtectSystem = "strict";
    ProtectHome = true;
    PrivateTmp = true;
    ProtectKernelTunables = true;
    ProtectKernelModules = true;
    ProtectKernelLogs = true;
    ProtectControlGroups = true;
    LockPersonality = true;
    RestrictSUIDSGID = true;
  };
  # The oneshots that prepare the daemon's inputs need no capability, device or namespace.
  # Root without any capability: what they write must be readable by the embassy, which
  # runs as root without CAP_DAC_OVERRIDE, so it must be owned by root.
  helperSandbox = baseSandbox // {
    User = "root";
    CapabilityBoundingSet = "";
    PrivateDevices = true;
    RestrictNamespaces = true;
    SystemCallFilter = [
      "@system-service"
      "~@privileged"
    ];
  };
in
{
  options.services.embassy = {
    enable = mkEnableOption "the embassy, a TPM-attested sealed-computation daemon for a Docker workload";

    package = mkOption {
      type = types.package;
      default = pkgs.callPackage ./package.nix { };
      defaultText = lib.literalExpression "pkgs.callPackage ./nix/package.nix { }";
      description = "The embassy package. Its installed files are what `embassy measure` hashes.";
    };

    settings = mkOption {
      type = types.submodule { options = settingsOptions; };
      default = { };
      description = ''
        The config file of `embassy serve`, key for key (docs/config.md). Rendered as JSON into
        the Nix store; the file, and so every key here, is part of the embassy's measurement.
        Unknown keys and ill-typed values are refused when the system is evaluated.
      '';
    };

    workloadMetadata = {
      source = mkOption {
        type = types.enum [
          "none"
          "file"
          "url"
        ];
        default = "none";
        description = ''
          Where the workload is chosen at boot: `none` (only `settings.workload`), `file` (a JSON
          file, e.g. on a config partition) or `url` (fetched by embassy-metadata.service from a
          cloud metadata server). For `file` and `url` the module sets
          `settings.workload_metadata` to the file the daemon reads; its keys override
          `settings.workload`. The choice is logged by the embassy as launch events (PCR 14),
          not measured into the boot PCRs, which stay the same for every workload.
        '';
      };

      file = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "/run/embassy-config/workload.json";
        description = "Absolute path of the metadata file, for `source = \"file\"`.";
      };

      url = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "http://metadata.google.internal/computeMetadata/v1/instance/attributes/embassy-workload";
        description = "http(s) URL of the metadata document, for `source = \"url\"`.";
      };

      headers = mkOption {
        type = types.attrsOf types.str;
        default = { };
        example = {
          Metadata-Flavor = "Google";
        };
        description = ''
          Request headers for the metadata URL (GCE wants Metadata-Flavor: Google). They are
          stored in the Nix store, readable by anyone on the machine: no secrets here.
        '';
      };

      timeoutSeconds = mkOption {
        type = types.ints.between 1 300;
        default = 10;
        description = "Connect and transfer timeout of one fetch attempt (there are up to 6).";
      };
    };

    workloadImages = mkOption {
      type = types.listOf types.path;
      default = [ ];
      example = lib.literalExpression "[ ./workload-image.tar ]";
      description = ''
        Docker image archives (`docker save` output) that embassy-workload-images.service
        loads with `docker load` before the embassy starts: the embassy never pulls. An archive
        in the Nix store is part of the image's closure and so of its dm-verity root hash.
      '';
    };

    imageLoadTimeoutSeconds = mkOption {
      type = types.ints.between 1 7200;
      default = 900;
      description = "How long loading all of `workloadImages` may take.";
    };

    watchdogSeconds = mkOption {
      type = types.ints.between 2 3600;
      default = 30;
      description = ''
        systemd's WatchdogSec for the daemon: it pings at half of it while its socket's accept
        loop turns, and a daemon that misses it is restarted (a restart fails closed: open
        sessions stay sealed and are reconciled from the log). docs/operations.md.
      '';
    };
  };

  config = mkIf cfg.enable (mkMerge [
    {
      assertions = [
        {
          assertion =
            meta.source != "file" || (meta.file != null && lib.hasPrefix "/" meta.file);
          message = "services.embassy.workloadMetadata.file must be an absolute path when source is \"file\".";
        }
        {
          assertion =
            meta.source != "url"
            || (
              meta.url != null
              && (lib.hasPrefix "http://" meta.url || lib.hasPrefix "https://" meta.url)
              && noControlChars meta.url
            );
          message = "services.embassy.workloadMetadata.url must be one line starting with http:// or https:// when source is \"url\".";
        }
        {
          assertion = lib.all (
            name: headerNameOk name && noControlChars meta.headers.${name}
          ) (lib.attrNames meta.headers);
          message = "services.embassy.workloadMetadata.headers: names are letters, digits and '-', values one line.";
        }
        {
          # Null is the daemon's debug mode with its own swtpm, which runs swtpm from Debian's
          # paths (embassy/tpm/swtpm.py) and has no hardware root of trust: not for NixOS.
          assertion = tpmDevice != null && builtins.match "/dev/[A-Za-z0-9_]+" tpmDevice != null;
          message = "services.embassy.settings.tpm.device must be set to a TPM device directly under /dev (e.g. /dev/tpmrm0).";
        }
        {
          # systemd creates and owns it (RuntimeDirectory); it is bind-mounted into the
          # workload, so it must hold the socket only.
          assertion = lib.hasPrefix "/run/" socketDir;
          message = "services.embassy.settings.socket must be in a directory under /run/.";
        }
        {
          assertion = lib.hasPrefix "/var/lib/" dataDir;
          message = "services.embassy.settings.data_dir must be under /var/lib/ (a StateDirectory).";
        }
      ];

      services.embassy.settings.workload_metadata = mkIf (metadataFile != null) metadataFile;

      # The daemon drives Docker through its socket and the TPM through the kernel's resource
      # manager; it pulls nothing and listens on no network port.
      virtualisation.docker.enable = true;
      security.tpm2.enable = true;

      # For nix/expected.nix and the image's output directory.
      system.build.embassyConfig = configFile;

      systemd.services.embassy = {
        description = "embassy: sealed computation with TPM-attested statements";
        wantedBy = [ "multi-user.target" ];
        requires = [
          "docker.service"
        ]
        ++ lib.optional (tpmDevice != null) tpmDeviceUnit
        ++ lib.optional fetchesMetadata "embassy-metadata.service"
        ++ lib.optional loadsImages "embassy-workload-images.service"
        ++ [ "embassy-spool.service" ];
        after = [
          "docker.service"
          "embassy-spool.service"
        ]
        ++ lib.optional (tpmDevice != null) tpmDeviceUnit
        ++ lib.optional fetchesMetadata "embassy-metadata.service"
        ++ lib.optional loadsImages "embassy-workload-images.service";
        unitConfig.RequiresMountsFor = [ dataDir ] ++ lib.optional (meta.source == "file") meta.file;

        serviceConfig = baseSandbox // {
          # READY=1 once the socket answers and the workload is launched, so units ordered
          # after this one find both; WATCHDOG=1 pings while the accept loop turns; only the
          # main process may notify (not swtpm, docker or anything the daemon runs).
          Type = "notify";
          NotifyAccess = "main";
          WatchdogSec = "${toString cfg.watchdogSeconds}s";
          # Start-up unseals keys, checks the log against the TPM and launches the workload
          # (an image may be large): more than the default 90 s is allowed before READY=1.
          TimeoutStartSec = "5min";
          ExecStart = execLine [
            "${cfg.package}/bin/embassy"
            "serve"
            "--config"
            configFile
          ];
          Restart = "on-failure";
          RestartSec = "5s";
          # 2: the config or policy is wrong; 5: the statement log failed its integrity check.
          # Neither heals by restarting, and a tamper stop must stay stopped until looked at.
          RestartPreventExitStatus = "2 5";

          # Root, because the daemon seals another network namespace (below) and talks to the
          # Docker socket (root:docker 0660), which is root-equivalent anyway.
          User = "root";
          UMask = "0077";
          # /run/embassy is bind-mounted into the workload: 0755 so a workload user can reach
          # the socket inside it (the socket itself is 0600), and kept across restarts, because
          # a running workload keeps the directory it was given; a new one would be invisible
          # to it.
          RuntimeDirectory = lib.removePrefix "/run/" socketDir;
          RuntimeDirectoryMode = "0755";
          RuntimeDirectoryPreserve = "yes";
          StateDirectory = lib.removePrefix "/var/lib/" dataDir;
          StateDirectoryMode = "0700";
          # Key material lives in its memory: no core dumps.
          LimitCORE = 0;
          # Under memory pressure the workload, not the embassy, should go first (a dead
          # embassy fails closed but stops answering).
          OOMScoreAdjust = -500;

          # Capabilities, each one needed:
          #   CAP_SYS_ADMIN  setns(2) into the workload's network namespace requires it (in
          #                  our user namespace and the namespace's owner), no less;
          #   CAP_NET_ADMIN  make the workload's link and flip it (the gate), and change that
          #                  namespace's netfilter tables and the host's nat table (ports);
          #   CAP_NET_RAW    libiptc talks to x_tables through a raw socket;
          #   CAP_SYS_PTRACE opening /proc/PID/ns/net of a workload that runs as another user
          #                  or keeps a capability the daemon lacks is a ptrace read-access
          #                  check; without it the sealed-namespace check fails (closed) for
          #                  such workloads. kernel.yama.ptrace_scope = 3 (nix/hardening.nix)
          #                  still forbids attaching to any process.
          # Everything else (DAC_OVERRIDE, SYS_MODULE, BPF, ...) is dropped from the bounding set.
          CapabilityBoundingSet = [
            "CAP_SYS_ADMIN"
            "CAP_NET_ADMIN"
            "CAP_NET_RAW"
            "CAP_SYS_PTRACE"
          ];

          # File system: read-only except its state and runtime directories, and the network
          # sysctls (ProtectKernelTunables makes /proc/sys read-only): the link it makes is
          # configured there (no forwarding or router advertisements in the workload's
          # namespace, no IPv6 on the host end, route_localnet for loopback-published ports).
          ReadWritePaths = [ "/proc/sys/net" ];
          # Devices: the TPM and the pseudo devices only. PrivateDevices= would hide the TPM.
          DevicePolicy = "closed";
          DeviceAllow = lib.optional (tpmDevice != null) "${tpmDevice} rw";
          # ProtectKernelModules (baseSandbox): modules are loaded at boot
          # (nix/hardening.nix); python-iptables' own modprobe attempt fails harmlessly.
          ProtectClock = true;
          ProtectHostname = true;
          PrivateIPC = true;
          RestrictRealtime = true;

          # Network: AF_UNIX for the API and the Docker socket, AF_INET/AF_INET6 for libiptc's
          # raw sockets, AF_NETLINK for glibc's interface and address lookups (CAP_NET_ADMIN is
          # held anyway). No IP traffic at all: the embassy has no network listener and talks
          # to nothing remote; this is enforced per cgroup, so it holds in any namespace the
          # daemon enters.
          RestrictAddressFamilies = [
            "AF_UNIX"
            "AF_INET"
            "AF_INET6"
            "AF_NETLINK"
          ];
          IPAddressDeny = "any";

          # Only network namespaces: entered (setns with CLONE_NEWNET), and one empty one
          # made at start, to build the seal's layer-3 tables in (embassy/seal/iptables.py).
          RestrictNamespaces = "net";
          # @system-service includes setns; @privileged (mount, bpf, module loading, swapon,
          # setuid and friends) is refused, so CAP_SYS_ADMIN cannot undo this sandbox.
          SystemCallFilter = [
            "@system-service"
            "~@privileged"
          ];
          SystemCallErrorNumber = "EPERM";
          SystemCallArchitectures = "native";

          # Left off, on purpose:
          #   PrivateNetwork  with CAP_SYS_ADMIN and setns the daemon can enter other network
          #                   namespaces anyway; IPAddressDeny above is the boundary that
          #                   holds in all of them.
          #   PrivateUsers    would make the capabilities above meaningless in the initial
          #                   user namespace, which owns the workload's network namespace.
          #   PrivateDevices  would hide the TPM (DevicePolicy=closed does the rest).
          #   ProtectProc=invisible / ProcSubset=pid  would hide /proc/PID of a workload that
          #                   runs as another user, and the sealed-namespace check with it.
          #   MemoryDenyWriteExecute  python-iptables passes Python callbacks to libxtables
          #                   (ctypes), which libffi backs with writable-executable or shared
          #                   executable trampolines unless static ones are built in; not
          #                   verified on the pinned libffi, and a refused mapping would stop
          #                   the seal.
        }
        # The one exception to IPAddressDeny: loopback, when metrics.listen is set
        # (docs/operations.md). A non-loopback metrics.listen also needs the scraper's address
        # in IPAddressAllow, set by hand.
        // lib.optionalAttrs (cfg.settings.metrics.listen != null) {
          IPAddressAllow = "localhost";
        };
      };

      # The activation spool (a size-limited tmpfs the workload writes its activation files
      # into) must be mounted where Docker sees it, before the workload's container is made:
      # the sandboxed daemon has a mount namespace of its own and no mount syscall, so this
      # oneshot mounts it from the host's namespace, with the daemon's own code and config.
      # The daemon then finds and reuses it (embassy/daemon/spool.py).
      systemd.services.embassy-spool = {
        description = "Mount the embassy's activation spool";
        before = [ "embassy.service" ];
        unitConfig.RequiresMountsFor = [ dataDir ];
        serviceConfig = {
          Type = "oneshot";
          RemainAfterExit = true;
          User = "root";
          ExecStart = execLine [
            "${cfg.package}/bin/embassy"
            "spool"
            "--config"
            configFile
          ];
          StateDirectory = lib.removePrefix "/var/lib/" dataDir;
          StateDirectoryMode = "0700";
          # Mounting in the host's mount namespace needs CAP_SYS_ADMIN and no private mount
          # namespace: none of the file-system sandboxing options, on purpose.
          CapabilityBoundingSet = [ "CAP_SYS_ADMIN" "CAP_CHOWN" "CAP_FOWNER" ];
          NoNewPrivileges = true;
          PrivateNetwork = true;
          RestrictAddressFamilies = [ "AF_UNIX" ];
          SystemCallArchitectures = "native";
        };
      };
    }

    (mkIf fetchesMetadata {
      # Fetch the workload section once per boot, before the embassy starts. It fails, and
      # with it the embassy (Requires=), if the server does not answer with a 2xx in time:
      # better no workload than an unchosen one. The file appears whole or not at all.
      systemd.services.embassy-metadata = {
        description = "Fetch the embassy's workload metadata";
        wants = [ "network-online.target" ];
        after = [ "network-online.target" ];
        before = [ "embassy.service" ];
        serviceConfig = helperSandbox // {
          Type = "oneshot";
          RemainAfterExit = true;
          ExecStart = [
            (execLine curlArgv)
            (execLine [
              "${pkgs.coreutils}/bin/mv"
              "--force"
              "--no-target-directory"
              "${fetchedMetadata}.part"
              fetchedMetadata
            ])
          ];
          TimeoutStartSec = 6 * (meta.timeoutSeconds + 2) + 10;
          RuntimeDirectory = "embassy-metadata";
          RuntimeDirectoryMode = "0700";
          UMask = "0077";
          PrivateIPC = true;
          ProtectClock = true;
          ProtectHostname = true;
          ProtectProc = "invisible";
          ProcSubset = "pid";
          MemoryDenyWriteExecute = true;
          RestrictRealtime = true;
          RestrictAddressFamilies = [
            "AF_INET"
            "AF_INET6"
            "AF_UNIX"
            "AF_NETLINK"
          ];
          SystemCallErrorNumber = "EPERM";
          SystemCallArchitectures = "native";
        };
      };
    })

    (mkIf loadsImages {
      # The embassy never pulls: its images come from archives built with the system (or
      # on its data partition), loaded once per boot before it starts.
      systemd.services.embassy-workload-images = {
        description = "Load the embassy's workload images into Docker";
        requires = [ "docker.service" ];
        after = [ "docker.service" ];
        before = [ "embassy.service" ];
        serviceConfig = helperSandbox // {
          Type = "oneshot";
          RemainAfterExit = true;
          ExecStart = map (
            archive:
            execLine [
              dockerCli
              "load"
              "--input"
              archive
            ]
          ) cfg.workloadImages;
          TimeoutStartSec = cfg.imageLoadTimeoutSeconds;
          # The client needs nothing but the Docker socket (a file, so it works in a private
          # network namespace) and a config directory of its own.
          Environment = [ "DOCKER_CONFIG=/run/embassy-workload-images" ];
          RuntimeDirectory = "embassy-workload-images";
          RuntimeDirectoryMode = "0700";
          PrivateNetwork = true;
          RestrictAddressFamilies = [ "AF_UNIX" ];
          SystemCallArchitectures = "native";
        };
      };
    })
  ]);
}
