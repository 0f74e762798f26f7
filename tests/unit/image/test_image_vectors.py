"""The pinned images in tests/vectors/image/ get exactly their pinned verdict.

``scripts/gen_vectors.py`` writes them and ``expected.json``; these tests read the files
from disk (``tests/unit/test_vectors.py`` checks they are up to date) and run each through
``embassy.image`` again: a good PE hashes to its pinned Authenticode digest and sections, a
good UKI predicts its pinned PCRs and events, a hostile one raises its pinned message.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from embassy.errors import ImageFormatError
from embassy.image import authenticode_digest, parse_expected, pe_sections, predict_boot_pcrs
from embassy.image.uki import replay

ROOT = Path(__file__).resolve().parents[3]
IMAGE_DIR = ROOT / "tests" / "vectors" / "image"
EXPECTED: dict[str, dict[str, Any]] = json.loads((IMAGE_DIR / "expected.json").read_bytes())
NAMES = sorted(EXPECTED)


def test_the_set_is_pinned() -> None:
    files = {p.stem for p in IMAGE_DIR.glob("*.efi")}
    assert files == set(NAMES)
    kinds = {(v["kind"], v["expect"] == "ok") for v in EXPECTED.values()}
    assert kinds == {("pe", True), ("pe", False), ("uki", True), ("uki", False)}
    assert sum(p.stat().st_size for p in IMAGE_DIR.iterdir()) < 50_000


@pytest.mark.parametrize("name", NAMES)
def test_vector(name: str) -> None:
    data = (IMAGE_DIR / f"{name}.efi").read_bytes()
    pinned = EXPECTED[name]
    if pinned["expect"] != "ok":
        assert name.startswith("bad-")
        check = authenticode_digest if pinned["kind"] == "pe" else predict_boot_pcrs
        with pytest.raises(ImageFormatError) as caught:
            check(data)
        assert caught.value.code == pinned["expect"]
        assert caught.value.message == pinned["message"]
        return
    assert authenticode_digest(data).hex() == pinned["authenticode_sha256"]
    if pinned["kind"] == "pe":
        sections = [[s.name, s.virtual_size, s.raw_size] for s in pe_sections(data)]
        assert sections == pinned["sections"]
        return
    prediction = predict_boot_pcrs(data)
    assert prediction.stub_version == pinned["stub_version"]
    assert {str(k): v.hex() for k, v in prediction.pcrs.items()} == pinned["pcrs"]
    events = [f"{e.pcr} {e.event_type} {e.digest.hex()}" for e in prediction.events]
    assert events == pinned["events"]
    # the pinned events alone replay to the pinned PCRs
    replayed = replay(prediction.events)
    assert {str(k): v.hex() for k, v in replayed.items()} == pinned["pcrs"]


def test_versions_differ_exactly_where_the_model_says() -> None:
    pcr11 = {name: EXPECTED[name]["pcrs"]["11"] for name in ("uki-252", "uki-254", "uki-258")}
    # 252 does not measure .uname and .sbat, 254 and 258 do, over the same bytes
    assert pcr11["uki-252"] != pcr11["uki-254"] == pcr11["uki-258"]
    # 258 does not let the firmware measure the kernel: one PCR 4 event fewer
    count = {n: sum(e.startswith("4 ") for e in EXPECTED[n]["events"]) for n in pcr11}
    assert count == {"uki-252": 4, "uki-254": 4, "uki-258": 3}


def test_pinned_expected_document() -> None:
    data = (IMAGE_DIR / "uki-252.expected.json").read_bytes()
    document = parse_expected(data)
    assert document.encode() == data
    pinned = EXPECTED["uki-252"]
    assert document.uki_authenticode.hex() == pinned["authenticode_sha256"]
    assert {str(k): v.hex() for k, v in document.pcrs.items()} == pinned["pcrs"]
    assert document.stub_version == 252
    assert document.measurement is not None
