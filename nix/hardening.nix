# Hardening of the embassy image, our own: nixpkgs dropped its profiles/hardened.nix in
# 2026, and an appliance whose PCRs are the proof should say each choice itself.
#
# The point: PCRs 13 and 14 are extended by software, so they mean something only if the
# measured boot (PCRs 4, 11, 12) proves a system in which nothing but the embassy can act
# as root. Hence no login of any kind, no way to change the running kernel, and a fixed set
# of kernel modules.
{ lib, ... }:
let
  # Kernel modules, loaded at boot by systemd-modules-load. security.lockKernelModules then
  # sets kernel.modules_disabled = 1 once the system is up, so anything needed later (the
  # first container, the first seal) must be in this list: on-demand loading would fail.
  # Module names as modprobe knows them ('-' and '_' are the same to it); dependencies
  # (nf_conntrack, nf_defrag_ipv4/6, stp, llc, ...) are loaded with their users.
  kernelModules = {
    # The seal (embassy/seal/, embassy/net/): the workload's one link is a veth pair on
    # the embassy's bridge (both in the docker list below); its layer-3 rules are legacy
    # x_tables in the workload's namespace, filter table only, IPv4 and IPv6, with no
    # match: interfaces and targets ACCEPT, DROP and jumps to its own chains, the standard
    # target of x_tables. The workload's published ports are legacy x_tables NAT in the
    # host namespace: DNAT and MASQUERADE, the tcp/udp and addrtype matches.
    # tests/integration/test_nix.py derives this set from the code and checks it is here.
    seal = [
      "x_tables"
      "ip_tables"
      "iptable_filter"
      "ip6_tables"
      "ip6table_filter"
      "iptable_nat"
      "xt_nat"
      "xt_MASQUERADE"
      "xt_tcpudp"
      "xt_addrtype"
    ];
    # Docker with bridge networking and overlay2. nixpkgs' Docker finds `iptables` on its
    # PATH, and nixpkgs' default iptables is the nf_tables flavour (xtables-nft-multi), so
    # its rules are nf_tables rules; the matches and targets iptables-nft cannot express
    # natively go through nft_compat to the x_tables extensions listed with it. Both sets
    # are listed because which one a rule needs depends on the iptables-nft version.
    docker = [
      "overlay" # the overlay2 storage driver
      "bridge" # docker0 and the embassy's own bridge network
      "br_netfilter" # bridged traffic through the FORWARD hooks (inter-container rules)
      "veth" # one pair per container
      "nf_conntrack_netlink" # Docker deletes stale conntrack entries over netlink
      "nf_nat"
      "nf_tables"
      "nft_compat" # x_tables matches and targets inside nf_tables rules
      "nft_chain_nat" # nat-type chains (DNAT for published ports, MASQUERADE)
      "nft_nat"
      "nft_masq"
      "nft_ct" # ct state ESTABLISHED,RELATED
      "nft_fib"
      "nft_fib_ipv4" # addrtype LOCAL, translated to a fib lookup
      "nft_fib_ipv6"
      "nft_reject"
      "nft_reject_inet"
      # xt_addrtype, xt_MASQUERADE, xt_nat, xt_tcpudp: with the seal's modules above
      "xt_conntrack"
      "xt_comment"
      "xt_mark"
    ];
    # The TPM, behind the kernel's resource manager (/dev/tpmrm0): CRB on most current
    # machines and cloud vTPMs, TIS on the rest.
    tpm = [
      "tpm_crb"
      "tpm_tis"
    ];
    # The store is an erofs file system on a dm-verity device (also in the initrd).
    storage = [
      "dm_verity"
      "erofs"
    ];
  };
in
{
  boot.kernelModules = lib.concatLists (lib.attrValues kernelModules);
  security.lockKernelModules = true;

  # Modules nobody here needs, refused even before the lock (during boot anything may still
  # be loaded on demand): rare network protocols and file systems with a history of bugs
  # reachable from an unprivileged socket() or mount().
  boot.blacklistedKernelModules = [
    "dccp"
    "sctp"
    "rds"
    "tipc"
    "n-hdlc"
    "ax25"
    "netrom"
    "x25"
    "rose"
    "decnet"
    "econet"
    "af_802154"
    "ipx"
    "appletalk"
    "psnap"
    "p8023"
    "p8022"
    "can"
    "atm"
    "cramfs"
    "freevxfs"
    "jffs2"
    "hfs"
    "hfsplus"
    "udf"
  ];

  # kexec off (kernel.kexec_load_disabled) and no hibernation: the running kernel can only
  # be the measured one.
  security.protectKernelImage = true;
  # Kernel page-table isolation even where the CPU claims not to need it.
  security.forcePageTableIsolation = true;
  # The hardened profile preloaded scudo; the daemon, Docker and numpy are tested on glibc's
  # allocator, and an LD_PRELOAD'd allocator is one more thing in every process.
  environment.memoryAllocator.provider = "libc";

  # Part of the UKI's command line, so of PCR 11.
  boot.kernelParams = [
    "slab_nomerge" # no merging of slab caches: an overflow stays within its own type
    "init_on_alloc=1" # zero pages and slab objects on allocation ...
    "init_on_free=1" # ... and on free: no stale secrets in reused memory
    "page_alloc.shuffle=1" # randomise the page allocator's free lists
    "randomize_kstack_offset=on" # a random kernel stack offset per system call
    "vsyscall=none" # no fixed-address vsyscall page to jump to
  ];

  boot.kernel.sysctl = {
    "kernel.kptr_restrict" = 2; # kernel pointers hidden from everyone (KASLR)
    "kernel.dmesg_restrict" = 1; # kernel log for CAP_SYSLOG only
    "kernel.unprivileged_bpf_disabled" = 1; # bpf() only with CAP_BPF / CAP_SYS_ADMIN
    "net.core.bpf_jit_harden" = 2; # constant blinding for all JIT-compiled BPF
    "kernel.sysrq" = 0; # no magic SysRq from a console keyboard or /proc/sysrq-trigger
    # No ptrace attach at all, root included, until reboot. The embassy holds CAP_SYS_PTRACE
    # only for read-access checks on /proc/PID/ns (not affected by Yama); this keeps that
    # capability from reaching into other processes' memory.
    "kernel.yama.ptrace_scope" = 3;
    "kernel.perf_event_paranoid" = 3; # no perf events (upstream kernels treat >2 as 2)
    "kernel.io_uring_disabled" = 2; # io_uring off: nothing here uses it, much attack surface
    "kernel.randomize_va_space" = 2; # full ASLR (the default, stated)
    "vm.unprivileged_userfaultfd" = 0; # userfaultfd only with CAP_SYS_PTRACE
    "dev.tty.ldisc_autoload" = 0; # no loading of line disciplines by unprivileged users
    "fs.protected_symlinks" = 1; # no following others' symlinks in sticky directories
    "fs.protected_hardlinks" = 1; # no hard links to files one cannot read and write
    "fs.protected_fifos" = 2; # no opening others' FIFOs in sticky directories
    "fs.protected_regular" = 2; # ... nor their regular files with O_CREAT
    "fs.suid_dumpable" = 0; # no core dumps of set-id programs
    # Network: the host routes only for its containers (Docker turns forwarding on itself);
    # it accepts no routing advice from its neighbours and drops spoofed sources.
    "net.ipv4.conf.all.rp_filter" = 1; # strict reverse-path filtering
    "net.ipv4.conf.default.rp_filter" = 1;
    "net.ipv4.conf.all.accept_redirects" = 0; # ICMP redirects could reroute its traffic
    "net.ipv4.conf.default.accept_redirects" = 0;
    "net.ipv4.conf.all.secure_redirects" = 0;
    "net.ipv4.conf.default.secure_redirects" = 0;
    "net.ipv6.conf.all.accept_redirects" = 0;
    "net.ipv6.conf.default.accept_redirects" = 0;
    "net.ipv4.conf.all.send_redirects" = 0; # and it sends none
    "net.ipv4.conf.default.send_redirects" = 0;
    "net.ipv4.conf.all.accept_source_route" = 0; # no source-routed packets
    "net.ipv4.conf.default.accept_source_route" = 0;
    "net.ipv6.conf.all.accept_source_route" = 0;
    "net.ipv6.conf.default.accept_source_route" = 0;
    "net.ipv4.conf.all.log_martians" = 1; # log impossible source addresses
    "net.ipv4.conf.default.log_martians" = 1;
    "net.ipv4.icmp_echo_ignore_broadcasts" = 1; # no smurf amplification
    "net.ipv4.tcp_syncookies" = 1; # SYN-flood resistance
    "net.ipv4.tcp_rfc1337" = 1; # drop RSTs for TIME-WAIT sockets (TIME-WAIT assassination)
  };

  # No interactive login of any kind: no getty on any console or serial line, no SSH, a
  # locked root and no way to add users or passwords at run time.
  systemd.services."getty@".enable = false;
  systemd.services."serial-getty@".enable = false;
  systemd.services."autovt@".enable = false;
  systemd.services."container-getty@".enable = false;
  services.openssh.enable = lib.mkForce false;
  users.mutableUsers = false;
  users.users.root.hashedPassword = "!";
  # Nobody has a password, deliberately; NixOS would otherwise refuse to build a system one
  # cannot log into.
  users.allowNoPasswordLogin = true;
  # A failed boot powers on into nothing rather than a root shell on the console.
  systemd.enableEmergencyMode = false;
  boot.initrd.systemd.emergencyAccess = false;

  # The system cannot change itself: no Nix, no switching to another configuration, no
  # installer tools. A new system is a new image with new PCRs.
  nix.enable = false;
  system.switch.enable = false;
  system.disableInstallerTools = true;
  # Nothing that is not needed.
  environment.defaultPackages = [ ];
  documentation.enable = false;
}
