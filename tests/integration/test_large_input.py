"""A 1 GiB sealed input goes through the real daemon and the example workload.

The seal pauses every flow of the workload (its only link goes down until the unseal), so
the service must have the whole input before it asks for the seal: it spools the
ciphertext to its container's disk (``workload_sdk.spool``) as the body arrives, then opens
the session and decrypts from the spool. A service that read the body after the seal would
wait for bytes that cannot arrive, and this request would run into the session's deadline.

The workload runs with a 192 MiB memory limit, so a service (or SDK) that held the input,
or even a large part of it, would be OOM-killed. The plaintext is generated on the fly,
encrypted to a temporary file on disk, and posted raw (``X-Embassy-Envelope`` header) with
``http.client`` reading the file as it sends. The output's byte count, SHA-256 and word
count must equal what the test computed while generating; the result verifies; the
container was not OOM-killed; the service process's peak resident memory (``VmHWM``) is a
small fraction of the input; and the spool left nothing in the container's filesystem.

The cgroup's own peak (v1 ``max_usage``) is printed but not bounded below the limit: it
counts the page cache of the spool file, which the kernel reclaims under the limit.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, cast

import pytest

from embassy.cli import main
from embassy.payload.envelope import make_payload
from embassy.verify.identity import verify_identity_document
from tests.integration.conftest import (
    SEALED_SERVICE_IMAGE,
    Daemon,
    embassy_id,
    ensure_sealed_service_image,
    published_port,
    remove_embassy_containers,
    require,
    wait_for_http,
)
from workload_sdk.stream import encrypt_stream

pytestmark = pytest.mark.integration
docker = pytest.importorskip("docker")

MEMORY_LIMIT = 192 * 1024 * 1024
# The example image runs as uid:gid 10001:10001 (examples/sealed_service/build.sh): the
# embassy's socket must be open to that group for it to connect.
WORKLOAD_GID = 10001
WORKLOAD = f"""
socket_group: "{WORKLOAD_GID}"
workload:
  image: {SEALED_SERVICE_IMAGE}
  ports: ["127.0.0.1:0:8080/tcp"]
  memory: "192m"
"""
BLOCK = 1024 * 1024
BLOCKS = 1024  # 1 GiB
TAG = b"block0000000000 "  # each block starts with its own index: no two blocks are equal


def _base_block() -> tuple[bytes, int]:
    """A deterministic 1 MiB block of text (after a 16-byte tag) and its word count.

    Long words keep the service's word count (``bytes.split``) cheap; the block ends with a
    newline and starts with a word, so the words of consecutive blocks add up.
    """
    rng = random.Random(20261122)
    words, size = [], len(TAG)
    while size < BLOCK - 80:
        word = rng.randbytes(rng.randrange(16, 36)).hex()
        words.append(word)
        size += len(word) + 1
    text = " ".join(words).encode()
    text += b"\n" * (BLOCK - len(TAG) - len(text))
    return TAG + text, 1 + len(words)


class Plaintext:
    """``BLOCKS`` blocks of ``BLOCK`` bytes, made as they are read; hashed on the way."""

    def __init__(self) -> None:
        self._base, self.words_per_block = _base_block()
        self._next = 0
        self._pending = memoryview(b"")
        self.sha256 = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        if not self._pending:
            if self._next == BLOCKS:
                return b""
            block = b"block%010d " % self._next + self._base[len(TAG) :]
            self._next += 1
            self.sha256.update(block)
            self.size += len(block)
            self._pending = memoryview(block)
        n = len(self._pending) if n < 0 else n
        out, self._pending = bytes(self._pending[:n]), self._pending[n:]
        return out

    @property
    def words(self) -> int:
        return self.words_per_block * self._next


def _peak_memory(container: Any) -> int:
    """The container's peak memory use (page cache included): cgroup v1 ``max_usage``."""
    cgroup = Path(f"/sys/fs/cgroup/memory/docker/{container.id}")
    if cgroup.is_dir():
        assert int((cgroup / "memory.limit_in_bytes").read_text()) == MEMORY_LIMIT
        return int((cgroup / "memory.max_usage_in_bytes").read_text())
    stats = container.stats(stream=False)["memory_stats"]
    return int(stats.get("max_usage") or stats["usage"])


def _service_peak_rss(container: Any) -> int:
    """The service's peak resident memory (``VmHWM``): its main process is the app."""
    pid = container.attrs["State"]["Pid"]
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            value, unit = line.split()[1:3]
            assert unit == "kB"
            return int(value) * 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


def _left_in_tmp(container: Any) -> list[str]:
    """What the container wrote into its /tmp (the spool's directory), read from the host."""
    upper = Path(container.attrs["GraphDriver"]["Data"]["UpperDir"]) / "tmp"
    return sorted(p.name for p in upper.iterdir()) if upper.is_dir() else []


@pytest.fixture
def world(daemon_factory: Callable[[str], Daemon]) -> Iterator[tuple[Daemon, Any, int]]:
    require("docker")
    client = docker.from_env()
    ensure_sealed_service_image(client)
    daemon = daemon_factory(WORKLOAD)
    eid = ""
    try:
        daemon.start()
        eid = embassy_id(daemon)
        port = published_port(client, eid)
        workload = client.containers.list(
            filters={"label": [f"org.embassy.id={eid}", "org.embassy.role=workload"]}
        )[0]
        wait_for_http(port)
        yield daemon, workload, port
    finally:
        if eid:
            remove_embassy_containers(client, eid)
        client.close()


def test_one_gib_streams_through_with_bounded_memory(
    world: tuple[Daemon, Any, int], tmp_path: Path
) -> None:
    daemon, workload, port = world
    workload.reload()
    assert workload.attrs["HostConfig"]["Memory"] == MEMORY_LIMIT
    rss_idle = _service_peak_rss(workload)  # after start-up: the interpreter and the model

    # The user verifies the identity, makes a payload, and encrypts the input to disk.
    doc = tmp_path / "identity.json"
    assert main(["identity", "--socket", str(daemon.socket), "--out", str(doc)]) == 0
    identity = verify_identity_document(
        doc.read_bytes(),
        daemon.trust(insecure_any_measurement=True),
    )
    assert identity.workload is not None
    envelope, input_key, _ = make_payload(
        identity.keys,
        measurement=identity.measurement.digest,
        launch_digest=identity.workload.launch_digest,
    )
    plaintext = Plaintext()
    stream = tmp_path / "input.embstrm"
    try:
        t0 = time.monotonic()
        with stream.open("wb") as dst:
            size = encrypt_stream(input_key, envelope.payload_id, cast(BinaryIO, plaintext), dst)
        t_encrypt = time.monotonic() - t0
        assert plaintext.size == BLOCK * BLOCKS
        assert size == stream.stat().st_size > plaintext.size

        # POST it raw: http.client reads the file as it sends it.
        header = base64.b64encode(json.dumps(envelope.to_json()).encode()).decode()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120, blocksize=BLOCK)
        t0 = time.monotonic()
        try:
            with stream.open("rb") as body:
                conn.request(
                    "POST",
                    "/infer",
                    body=body,
                    headers={
                        "Content-Type": "application/octet-stream",
                        "Content-Length": str(size),
                        "X-Embassy-Envelope": header,
                    },
                )
            response = conn.getresponse()
            status, reply = response.status, json.loads(response.read())
        finally:
            conn.close()
        t_request = time.monotonic() - t0
    finally:
        stream.unlink(missing_ok=True)

    assert status == 200, reply
    output = base64.b64decode(reply["output"])
    facts = json.loads(output)
    assert facts["bytes"] == plaintext.size == 1 << 30
    assert facts["sha256"] == plaintext.sha256.hexdigest()
    assert facts["words"] == plaintext.words
    assert facts["upper_preview"].startswith("BLOCK0000000000 ")

    bundle = tmp_path / "result.json"
    bundle.write_text(json.dumps(reply["result"]))
    policy = ["--identity", str(doc), *daemon.trust_flags(), "--allow-software-tpm"]
    policy += ["--expect-measurement", identity.measurement.digest.hex()]
    verify = ["verify", "result", str(bundle), "--payload-id", envelope.payload_id.hex()]
    assert main([*verify, *policy]) == 0

    workload.reload()
    assert workload.status == "running"
    assert not workload.attrs["State"]["OOMKilled"]
    peak = _peak_memory(workload)
    rss = _service_peak_rss(workload)
    print(
        f"\n1 GiB sealed input: encrypt to disk {t_encrypt:.1f} s, request {t_request:.1f} s "
        f"({size / t_request / 2**20:.0f} MiB/s, spooled then decrypted); service peak RSS "
        f"{rss / 2**20:.1f} MiB ({rss_idle / 2**20:.1f} MiB idle); container peak (page "
        "cache included) "
        f"{peak / 2**20:.1f} MiB of {MEMORY_LIMIT / 2**20:.0f} MiB; running as "
        f"{workload.attrs['Config']['User'] or 'root'}"
    )
    assert 0 < peak <= MEMORY_LIMIT
    # O(chunk): the request adds a few chunks to what start-up (the interpreter, numpy, the
    # model's weights for /embed) already took; nowhere near the input's size.
    assert rss - rss_idle < 32 * 1024 * 1024
    assert _left_in_tmp(workload) == []
