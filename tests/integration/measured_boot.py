"""A real measured boot, for tests: a UKI under OVMF in QEMU with a software TPM (swtpm).

The pieces:

* :func:`fetch_kernel` -- the Debian kernel ``linux-image-amd64`` points at, downloaded with
  ``apt-get download`` once and kept in a cache directory (``EMBASSY_TEST_CACHE``, default
  ``/var/cache/embassy-test`` or ``~/.cache/embassy-test`` when that is not writable).
* :func:`build_initrd` -- a gzip'd newc cpio, written here byte by byte (no root needed, the same
  bytes on every run): the static busybox and an ``/init`` that prints the TPM's SHA-256 PCRs
  and the firmware's TCG event log on the serial console, then powers the machine off.
* :func:`build_uki` -- ``objcopy`` of systemd's stub with ``.osrel``, ``.cmdline``, ``.linux``
  and ``.initrd`` sections, as systemd-stub(7) of systemd 252 describes it.
* :func:`boot_uki` -- a fresh swtpm and a fresh copy of the OVMF variable store per boot, the UKI
  as ``\\EFI\\BOOT\\BOOTX64.EFI`` of a read-only FAT disk, no network; KVM when it is usable,
  TCG otherwise.
* the firmware's event log comes back parsed by :mod:`tests.integration.tcg_eventlog`.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import gzip
import hashlib
import io
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.integration.tcg_eventlog import LogEvent, parse_event_log

STUB = Path("/usr/lib/systemd/boot/efi/linuxx64.efi.stub")
# (firmware code, variable store template): the plain builds, no Secure Boot, no SMM.
OVMF_CANDIDATES = (
    (Path("/usr/share/OVMF/OVMF_CODE_4M.fd"), Path("/usr/share/OVMF/OVMF_VARS_4M.fd")),
    (Path("/usr/share/OVMF/OVMF_CODE.fd"), Path("/usr/share/OVMF/OVMF_VARS.fd")),
)
QEMU = "qemu-system-x86_64"
REQUIRED_BINARIES = (QEMU, "swtpm", "objcopy", "busybox", "apt-get", "apt-cache", "dpkg-deb")

KERNEL_META_PACKAGE = "linux-image-amd64"
OSREL = 'NAME="embassy measured-boot test"\nID=embassy-test\nVERSION_ID=1\n'
# Where systemd-stub(7) (systemd 252) puts the sections: above the stub's own (which end below
# 0x20000) and apart from each other. The kernel is < 16 MiB, so .initrd does not overlap it.
SECTION_VMAS = (
    (".osrel", 0x20000),
    (".cmdline", 0x30000),
    (".linux", 0x2000000),
    (".initrd", 0x3000000),
)

_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
_KVM_CREATE_VM = 0xAE01
_SOCKET_PATH_MAX = 100

# ---- the kernel --------------------------------------------------------------------------------


def cache_root() -> Path:
    """Where downloaded kernels are kept between runs."""
    configured = os.environ.get("EMBASSY_TEST_CACHE")
    if configured:
        return Path(configured)
    system = Path("/var/cache/embassy-test")
    with contextlib.suppress(OSError):
        system.mkdir(parents=True, exist_ok=True)
    if os.access(system, os.W_OK | os.X_OK):
        return system
    return Path.home() / ".cache" / "embassy-test"


def _run(argv: Sequence[str], *, timeout: float, cwd: Path | None = None) -> str:
    proc = subprocess.run(
        list(argv),
        cwd=cwd,
        env=_ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def resolve_kernel_package() -> str:
    """The versioned kernel package Debian's ``linux-image-amd64`` depends on."""
    out = _run(["apt-cache", "depends", KERNEL_META_PACKAGE], timeout=60)
    for line in out.splitlines():
        m = re.fullmatch(r"\s*\|?Depends:\s*(linux-image-\d[\w.+-]*-amd64)\s*", line)
        if m:
            return m.group(1)
    raise RuntimeError(f"no versioned kernel among the dependencies of {KERNEL_META_PACKAGE}")


def _kernel_config_problems(config: str) -> list[str]:
    """What keeps this kernel from finding the TPM without modules (empty when all is well)."""
    values = dict(line.split("=", 1) for line in config.splitlines() if line.startswith("CONFIG_"))
    problems = [
        f"{opt} is {values.get(opt, 'not set')}"
        for opt in ("CONFIG_TCG_TPM", "CONFIG_SECURITYFS", "CONFIG_BLK_DEV_INITRD", "CONFIG_EFI")
        if values.get(opt) != "y"
    ]
    if values.get("CONFIG_TCG_CRB") != "y" and values.get("CONFIG_TCG_TIS") != "y":
        problems.append("neither CONFIG_TCG_CRB nor CONFIG_TCG_TIS is built in")
    if values.get("CONFIG_RD_GZIP") != "y":
        problems.append("CONFIG_RD_GZIP is not y")
    return problems


def fetch_kernel(cache: Path | None = None, *, download: bool = True) -> Path:
    """The vmlinuz of Debian's current amd64 kernel, downloaded once into the cache.

    ``scripts/setup.sh`` downloads it (``python -m tests.integration.measured_boot``); tests
    pass ``download=False``, so that no test sends traffic off the machine.
    ``EMBASSY_TEST_KERNEL`` names a vmlinuz to use instead (its TPM driver must be built in).
    """
    override = os.environ.get("EMBASSY_TEST_KERNEL")
    if override:
        return Path(override)
    package = resolve_kernel_package()
    root = (cache or cache_root()) / "kernel"
    target = root / package
    vmlinuz = target / "vmlinuz"
    if vmlinuz.is_file():
        return vmlinuz
    if not download:
        raise RuntimeError(f"{package} is not in {root}: run scripts/setup.sh to fetch it")
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if vmlinuz.is_file():  # another run fetched it while this one waited
            return vmlinuz
        with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as tmp_name:
            tmp = Path(tmp_name)
            _run(["apt-get", "download", package], cwd=tmp, timeout=600)
            debs = sorted(tmp.glob("*.deb"))
            if len(debs) != 1:
                raise RuntimeError(f"apt-get download {package} left {debs}")
            tree = tmp / "tree"
            _run(["dpkg-deb", "-x", str(debs[0]), str(tree)], timeout=300)
            kernels = sorted((tree / "boot").glob("vmlinuz-*"))
            configs = sorted((tree / "boot").glob("config-*"))
            if len(kernels) != 1 or len(configs) != 1:
                raise RuntimeError(f"{package}: expected one vmlinuz and one config in /boot")
            problems = _kernel_config_problems(configs[0].read_text())
            if problems:
                raise RuntimeError(
                    f"{package} cannot boot this test without TPM modules: {'; '.join(problems)}"
                )
            staged = tmp / "staged"
            staged.mkdir()
            shutil.copyfile(kernels[0], staged / "vmlinuz")
            shutil.copyfile(configs[0], staged / "config")
            (staged / "release").write_text(kernels[0].name.removeprefix("vmlinuz-") + "\n")
            staged.rename(target)
    return vmlinuz


# ---- the initrd --------------------------------------------------------------------------------

INIT_SCRIPT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t securityfs securityfs /sys/kernel/security
echo 1 > /proc/sys/kernel/printk
i=0
while [ ! -e /sys/class/tpm/tpm0/pcr-sha256/0 ] && [ "$i" -lt 200 ]; do
  sleep 0.1
  i=$((i + 1))
done
echo "EMBASSY-BEGIN"
if [ ! -e /sys/class/tpm/tpm0/pcr-sha256/0 ]; then
  echo "EMBASSY-ERROR no TPM at /sys/class/tpm/tpm0"
else
  echo "EMBASSY-CMDLINE $(cat /proc/cmdline)"
  for n in $(seq 0 23); do
    echo "EMBASSY-PCR $n $(cat /sys/class/tpm/tpm0/pcr-sha256/$n)"
  done
  log=/sys/kernel/security/tpm0/binary_bios_measurements
  if cat "$log" > /tmp/eventlog; then
    echo "EMBASSY-EVENTLOG-BEGIN $(wc -c < /tmp/eventlog) $(sha256sum /tmp/eventlog)"
    base64 /tmp/eventlog
    echo "EMBASSY-EVENTLOG-END"
  else
    echo "EMBASSY-ERROR no event log at $log"
  fi
fi
echo "EMBASSY-END"
sync
poweroff -f
"""


def _cpio_entry(
    name: str, mode: int, data: bytes = b"", *, ino: int, rdev: tuple[int, int] = (0, 0)
) -> bytes:
    encoded = name.encode() + b"\x00"
    fields = (
        ino,
        mode,
        0,  # uid
        0,  # gid
        2 if mode & 0o170000 == 0o040000 else 1,  # nlink
        0,  # mtime: fixed, for the same bytes on every build
        len(data),
        0,  # dev major
        0,  # dev minor
        rdev[0],
        rdev[1],
        len(encoded),
        0,  # check
    )
    header = b"070701" + b"".join(b"%08X" % f for f in fields)
    out = header + encoded
    out += b"\x00" * (-len(out) % 4)
    out += data
    out += b"\x00" * (-len(out) % 4)
    return out


def busybox_path() -> Path:
    """The static busybox (Debian's busybox-static installs it as /bin/busybox)."""
    found = shutil.which("busybox", path=_ENV["PATH"])
    if found is None:
        raise RuntimeError("busybox not found")
    path = Path(found).resolve()
    if not _is_static_elf64(path.read_bytes()):
        raise RuntimeError(f"{path} is not a static busybox (install busybox-static)")
    return path


def _is_static_elf64(blob: bytes) -> bool:
    """Whether ``blob`` is a little-endian ELF64 without a program interpreter (PT_INTERP)."""
    if len(blob) < 64 or blob[:6] != b"\x7fELF\x02\x01":
        return False
    (phoff,) = struct.unpack_from("<Q", blob, 32)
    phentsize, phnum = struct.unpack_from("<HH", blob, 54)
    for i in range(phnum):
        (p_type,) = struct.unpack_from("<I", blob, phoff + i * phentsize)
        if p_type == 3:  # PT_INTERP
            return False
    return True


def build_initrd() -> bytes:
    """The initrd as gzip'd newc cpio: busybox, /init, and the directories /init mounts on."""
    directories = ("bin", "dev", "proc", "sys", "tmp")
    entries = [_cpio_entry(".", 0o040755, ino=1)]
    ino = 2
    for d in directories:
        entries.append(_cpio_entry(d, 0o040755, ino=ino))
        ino += 1
    # The kernel opens /dev/console for init's stdio before /init runs.
    entries.append(_cpio_entry("dev/console", 0o020600, ino=ino, rdev=(5, 1)))
    entries.append(_cpio_entry("bin/busybox", 0o100755, busybox_path().read_bytes(), ino=ino + 1))
    entries.append(_cpio_entry("init", 0o100755, INIT_SCRIPT.encode(), ino=ino + 2))
    entries.append(_cpio_entry("TRAILER!!!", 0, ino=0))
    archive = b"".join(entries)
    archive += b"\x00" * (-len(archive) % 512)
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0, compresslevel=9) as gz:
        gz.write(archive)
    return out.getvalue()


# ---- the UKI -----------------------------------------------------------------------------------


def build_uki(kernel: Path, initrd: bytes, cmdline: str, out: Path, *, osrel: str = OSREL) -> bytes:
    """Assemble a UKI from systemd's stub with objcopy; write it to ``out`` and return it."""
    with tempfile.TemporaryDirectory(prefix="uki-") as tmp_name:
        tmp = Path(tmp_name)
        contents = {
            ".osrel": osrel.encode(),
            ".cmdline": cmdline.encode(),
            ".linux": kernel.read_bytes(),
            ".initrd": initrd,
        }
        argv = ["objcopy"]
        for section, vma in SECTION_VMAS:
            path = tmp / section.lstrip(".")
            path.write_bytes(contents[section])
            argv += [
                "--add-section",
                f"{section}={path}",
                "--change-section-vma",
                f"{section}=0x{vma:x}",
            ]
        argv += [str(STUB), str(out)]
        _run(argv, timeout=120)
    uki = _without_timestamp(out.read_bytes())
    out.write_bytes(uki)
    return uki


def _without_timestamp(pe: bytes) -> bytes:
    """``pe`` with its build time removed, so the same inputs give the same UKI on every run.

    objcopy stamps the COFF header's TimeDateStamp with the time of the build (and Authenticode
    covers it); it goes back to zero, as in the stub itself, and the optional header's CheckSum
    is recomputed.
    """
    (pe_offset,) = struct.unpack_from("<I", pe, 0x3C)
    if pe[pe_offset : pe_offset + 4] != b"PE\x00\x00":
        raise RuntimeError("objcopy did not write a PE image")
    out = bytearray(pe)
    struct.pack_into("<I", out, pe_offset + 8, 0)  # COFF header: TimeDateStamp
    checksum_offset = pe_checksum_offset(pe)
    struct.pack_into("<I", out, checksum_offset, 0)
    struct.pack_into("<I", out, checksum_offset, _pe_checksum(bytes(out)))
    return bytes(out)


def pe_checksum_offset(pe: bytes) -> int:
    """Where the optional header's CheckSum field is."""
    (pe_offset,) = struct.unpack_from("<I", pe, 0x3C)
    return int(pe_offset) + 24 + 64


def _pe_checksum(pe: bytes) -> int:
    """The PE image checksum of ``pe``, whose CheckSum field must read zero.

    The little-endian 16-bit words summed with end-around carry, plus the file's length.
    """
    words = array("H", pe + b"\x00" * (len(pe) % 2))
    if sys.byteorder == "big":
        words.byteswap()
    total = sum(words)
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total + len(pe)


# ---- the VM ------------------------------------------------------------------------------------


def ovmf_files() -> tuple[Path, Path]:
    for code, variables in OVMF_CANDIDATES:
        if code.is_file() and variables.is_file():
            return code, variables
    raise RuntimeError("no OVMF firmware found (install ovmf)")


def _kvm_opens() -> bool:
    """Whether this process can create a KVM VM (the device may exist and still refuse)."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        vm = fcntl.ioctl(fd, _KVM_CREATE_VM, 0)
    except OSError:
        return False
    else:
        os.close(vm)
        return True
    finally:
        os.close(fd)


# Set once a KVM boot hit "KVM internal error" (seen under some nested hypervisors: /dev/kvm
# opens and creates VMs, then cannot run the firmware), so later boots go straight to TCG.
_KVM_BROKEN: set[str] = set()


def choose_accel() -> str:
    """``EMBASSY_TEST_ACCEL`` (kvm or tcg) if set; else KVM when it works, TCG otherwise."""
    forced = os.environ.get("EMBASSY_TEST_ACCEL", "")
    if forced in ("kvm", "tcg"):
        return forced
    if forced:
        raise ValueError(f"EMBASSY_TEST_ACCEL={forced!r}: expected kvm or tcg")
    return "kvm" if not _KVM_BROKEN and _kvm_opens() else "tcg"


@dataclass
class BootResult:
    """What the booted machine reported over its serial console."""

    pcrs: dict[int, bytes]
    cmdline: str
    event_log: bytes
    events: list[LogEvent]
    accel: str
    seconds: float
    console: str = field(repr=False)

    def events_for(self, pcr: int) -> list[LogEvent]:
        return [e for e in self.events if e.pcr == pcr and e.extends]

    def describe(self, *pcrs: int) -> str:
        return "\n".join(e.describe() for e in self.events if e.pcr in pcrs and e.extends)


class BootError(AssertionError):
    """The VM did not produce a complete report; the message carries the console's tail."""


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


def parse_console(console: str) -> tuple[dict[int, bytes], str, bytes]:
    """The PCRs, kernel command line and event log that /init printed."""
    lines = [line.rstrip("\r") for line in console.splitlines()]
    errors = [line for line in lines if line.startswith("EMBASSY-ERROR")]
    if errors:
        raise BootError(f"{errors[0]}\n--- console ---\n{_tail(console)}")
    if "EMBASSY-END" not in lines:
        raise BootError(f"no complete report on the console\n--- console ---\n{_tail(console)}")
    pcrs: dict[int, bytes] = {}
    cmdline: str | None = None
    log_lines: list[str] | None = None
    log_header: tuple[int, str] | None = None
    for line in lines:
        if log_lines is not None:
            if line == "EMBASSY-EVENTLOG-END":
                break
            log_lines.append(line.strip())
        elif line.startswith("EMBASSY-PCR "):
            m = re.fullmatch(r"EMBASSY-PCR (\d+) ([0-9A-Fa-f]{64})", line)
            if m is None:
                raise BootError(f"garbled PCR line {line!r}\n--- console ---\n{_tail(console)}")
            pcrs[int(m.group(1))] = bytes.fromhex(m.group(2))
        elif line.startswith("EMBASSY-CMDLINE "):
            cmdline = line.removeprefix("EMBASSY-CMDLINE ")
        elif line.startswith("EMBASSY-EVENTLOG-BEGIN "):
            _, size, digest = line.split()[:3]
            log_header = (int(size), digest)
            log_lines = []
    if log_lines is None or log_header is None or cmdline is None or sorted(pcrs) != [*range(24)]:
        raise BootError(f"incomplete report\n--- console ---\n{_tail(console)}")
    try:
        log = base64.b64decode("".join(log_lines), validate=True)
    except ValueError:
        log = b""
    if len(log) != log_header[0] or hashlib.sha256(log).hexdigest() != log_header[1]:
        raise BootError("the event log was garbled on the serial console")
    return pcrs, cmdline, log


class _KvmBroken(Exception):
    """QEMU stopped on a KVM internal error: this host's KVM cannot run the guest."""


def _wait_for_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BootError(f"swtpm exited {proc.returncode} before listening")
        if path.exists():
            with (
                socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe,
                contextlib.suppress(OSError),
            ):
                probe.connect(str(path))
                return
        time.sleep(0.02)
    raise BootError(f"swtpm did not create {path}")


@contextlib.contextmanager
def _reaped(proc: subprocess.Popen[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    """Kill the process on every way out (it is ours: we started it and hold its Popen)."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


def boot_uki(uki: Path, workdir: Path, *, timeout: float = 150.0) -> BootResult:
    """Boot ``uki`` once on a fresh TPM and fresh firmware variables; return what it reported.

    Raises :class:`BootError` (with the console's tail) when the machine does not report.
    """
    accel = choose_accel()
    try:
        return _boot(uki, workdir / accel, accel, timeout)
    except _KvmBroken:
        _KVM_BROKEN.add("kvm")
        if os.environ.get("EMBASSY_TEST_ACCEL") == "kvm":
            raise BootError("KVM internal error (EMBASSY_TEST_ACCEL=kvm)") from None
    return _boot(uki, workdir / "tcg", "tcg", timeout)


def _qemu_argv(
    accel: str, code: Path, variables: Path, ctrl: Path, esp: Path, console: Path
) -> list[str]:
    return [
        QEMU,
        "-machine",
        "q35",
        "-accel",
        accel,
        "-m",
        "512",
        "-smp",
        "1",
        "-nodefaults",
        "-display",
        "none",
        "-no-reboot",
        "-nic",
        "none",
        "-drive",
        f"if=pflash,format=raw,unit=0,readonly=on,file={code}",
        "-drive",
        f"if=pflash,format=raw,unit=1,file={variables}",
        "-chardev",
        f"socket,id=chrtpm,path={ctrl}",
        "-tpmdev",
        "emulator,id=tpm0,chardev=chrtpm",
        "-device",
        "tpm-crb,tpmdev=tpm0",
        # vvfat, read-only: a FAT file system made from the directory, nothing written back.
        "-drive",
        f"if=none,id=esp,format=raw,readonly=on,file=fat:{esp}",
        "-device",
        "virtio-blk-pci,drive=esp,bootindex=0",
        "-chardev",
        f"file,id=serial0,path={console}",
        "-serial",
        "chardev:serial0",
    ]


def _read_console(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _boot(uki: Path, workdir: Path, accel: str, timeout: float) -> BootResult:
    code, vars_template = ovmf_files()
    workdir.mkdir(parents=True, exist_ok=True)
    esp = workdir / "esp"
    (esp / "EFI" / "BOOT").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(uki, esp / "EFI" / "BOOT" / "BOOTX64.EFI")
    variables = workdir / "OVMF_VARS.fd"
    shutil.copyfile(vars_template, variables)
    console_path = workdir / "console.log"
    console_path.unlink(missing_ok=True)
    qemu_log = workdir / "qemu.log"

    with contextlib.ExitStack() as stack:
        # AF_UNIX paths are limited to 108 bytes; pytest's temporary directories can be long.
        tpm_dir = workdir / "tpm"
        if len(str(tpm_dir / "ctrl.sock")) > _SOCKET_PATH_MAX:
            tpm_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mb-tpm-")))
        tpm_dir.mkdir(exist_ok=True)
        ctrl = tpm_dir / "ctrl.sock"
        # A fresh state directory: swtpm manufactures a new TPM; QEMU sends it CMD_INIT and
        # the firmware sends TPM2_Startup, as on a real power-on.
        swtpm = stack.enter_context(
            _reaped(
                subprocess.Popen(
                    [
                        "swtpm",
                        "socket",
                        "--tpm2",
                        "--tpmstate",
                        f"dir={tpm_dir}",
                        "--ctrl",
                        f"type=unixio,path={ctrl}",
                        "--log",
                        f"file={workdir / 'swtpm.log'},level=1",
                    ],
                    env=_ENV,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        )
        _wait_for_socket(ctrl, swtpm, timeout=10)

        started = time.monotonic()
        with qemu_log.open("wb") as qemu_out:
            qemu = stack.enter_context(
                _reaped(
                    subprocess.Popen(
                        _qemu_argv(accel, code, variables, ctrl, esp, console_path),
                        env=_ENV,
                        stdin=subprocess.DEVNULL,
                        stdout=qemu_out,
                        stderr=subprocess.STDOUT,
                    )
                )
            )
        while True:
            try:
                qemu.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                pass
            if accel == "kvm" and b"KVM internal error" in qemu_log.read_bytes():
                raise _KvmBroken
            if time.monotonic() - started > timeout:
                raise BootError(
                    f"the VM ({accel}) did not power off within {timeout:.0f} s"
                    f"\n--- console ---\n{_tail(_read_console(console_path))}"
                )
        seconds = time.monotonic() - started
    console = _read_console(console_path)
    if qemu.returncode != 0:
        raise BootError(
            f"qemu exited {qemu.returncode}: {qemu_log.read_text(errors='replace')}"
            f"\n--- console ---\n{_tail(console)}"
        )
    pcrs, cmdline, log = parse_console(console)
    return BootResult(
        pcrs=pcrs,
        cmdline=cmdline,
        event_log=log,
        events=parse_event_log(log),
        accel=accel,
        seconds=seconds,
        console=console,
    )


if __name__ == "__main__":
    # scripts/setup.sh: fetch the test kernel once, outside any test.
    sys.stdout.write(f"{fetch_kernel()}\n")
