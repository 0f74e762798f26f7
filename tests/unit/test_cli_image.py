"""`embassy measure --uki` and `embassy verify --expected`: from a UKI to pinned boot PCRs.

The embassies here run on a FakeTpm that calls itself hardware, whose boot PCRs are
extended with the events the model predicts for a UKI: the firmware's part, played by the
test. The verifier is then told the image's expected.json and nothing else about the boot.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from embassy.attest.types import TpmMode
from embassy.cli import main
from embassy.image.expected import expected_image, parse_expected
from embassy.image.uki import predict_boot_pcrs
from embassy.measure import measure
from embassy.wire.codec import canonical_json
from tests.fakes import FakeTpm
from tests.unit.conftest import MEASUREMENT, EmbassyFactory, trust_flags

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "image"
UKI = VECTORS / "uki-252.efi"
OTHER_UKI = VECTORS / "uki-254.efi"


def test_measure_uki_prints_the_expected_document(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "embassy.yaml"
    config.write_text("pcrs: {boot: [4, 11, 12]}\n")
    assert main(["measure", "--config", str(config), "--uki", str(UKI)]) == 0
    out = capsys.readouterr().out.encode()
    expected = parse_expected(out.strip())
    assert out.strip() == expected.encode()  # canonical on the way out
    assert dict(expected.pcrs) == dict(predict_boot_pcrs(UKI.read_bytes()).pcrs)
    assert main(["measure", "--config", str(config), "--json"]) == 0
    measured = json.loads(capsys.readouterr().out)
    assert expected.measurement is not None
    assert expected.measurement.to_json() == measured


def test_measure_uki_phases_and_secure_boot_change_the_prediction(
    capsys: pytest.CaptureFixture[str],
) -> None:
    outputs = []
    for extra in ([], ["--phases", ""], ["--phases", "enter-initrd"], ["--secure-boot"]):
        assert main(["measure", "--uki", str(UKI), *extra]) == 0
        outputs.append(parse_expected(capsys.readouterr().out.strip().encode()))
    assert len({e.pcrs[11] for e in outputs[:3]}) == 3
    assert outputs[1].phases == ()
    assert outputs[3].pcrs[4] != outputs[0].pcrs[4]  # stub 252 hands the kernel to LoadImage
    assert outputs[3].pcrs[11] == outputs[0].pcrs[11]


@pytest.mark.parametrize(
    ("argv", "code", "fragment"),
    [
        (["--uki", str(VECTORS / "bad-no-mz.efi")], 3, "MZ"),
        (["--uki", str(VECTORS / "bad-uki-stub-261.efi")], 3, "261"),
        (["--uki", str(VECTORS / "absent.efi")], 2, "cannot read"),
        (["--uki", str(UKI), "--phases", "ready,bad word"], 3, "phase"),
    ],
)
def test_measure_uki_refuses_what_it_cannot_predict(
    argv: list[str], code: int, fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["measure", *argv]) == code
    out = capsys.readouterr()
    assert out.out == ""
    assert fragment in out.err


class Booted:
    """A hardware-mode FakeTpm booted from UKI, an embassy on it, and its documents."""

    def __init__(self, factory: EmbassyFactory, tmp: Path, uki: Path) -> None:
        self.tpm = FakeTpm(b"hardware", mode=TpmMode.HARDWARE)
        for event in predict_boot_pcrs(uki.read_bytes()).events:
            self.tpm.extend(event.pcr, event.digest)
        self.embassy = factory(self.tpm)
        self.identity = tmp / "identity.json"
        self.identity.write_bytes(canonical_json(self.embassy.identity_document()))
        self.trust = trust_flags(self.tpm, tmp)

    def verify(self, *flags: str) -> int:
        return main(["verify", "identity", str(self.identity), *self.trust, *flags])


def _expected_file(tmp: Path, uki: Path, name: str = "expected.json") -> Path:
    path = tmp / name
    path.write_bytes(expected_image(uki.read_bytes(), MEASUREMENT).encode())
    return path


def test_verify_with_the_image_expected_json_pins_boot_and_measurement(
    make_embassy: EmbassyFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    booted = Booted(make_embassy, tmp_path, UKI)
    # Nothing pinned: hardware evidence is refused (the measurement is missing first).
    assert booted.verify() == 1
    assert booted.verify("--expect-measurement", MEASUREMENT.digest.hex()) == 1
    assert "no boot PCRs pinned" in capsys.readouterr().err
    assert booted.verify("--expected", str(_expected_file(tmp_path, UKI))) == 0
    out = capsys.readouterr().out
    assert "ok    boot-pcrs" in out
    assert "ok    measurement" in out


def test_verify_refuses_another_image(
    make_embassy: EmbassyFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    booted = Booted(make_embassy, tmp_path, OTHER_UKI)  # the host booted something else
    expected = _expected_file(tmp_path, UKI)
    assert booted.verify("--expected", str(expected)) == 1
    err = capsys.readouterr().err
    pinned = parse_expected(expected.read_bytes()).pcrs[4].hex()
    assert f"pcr-mismatch: PCR 4 is {booted.tpm.pcrs[4].hex()}, expected {pinned}" in err


def test_verify_refuses_another_measurement_in_expected_json(
    make_embassy: EmbassyFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    booted = Booted(make_embassy, tmp_path, UKI)
    other = tmp_path / "other.json"
    other.write_bytes(expected_image(UKI.read_bytes(), measure(booted.embassy.config)).encode())
    assert booted.verify("--expected", str(other)) == 1
    assert "embassy measurement is" in capsys.readouterr().err


def test_flags_that_contradict_expected_json_are_usage_errors(
    make_embassy: EmbassyFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    booted = Booted(make_embassy, tmp_path, UKI)
    expected = _expected_file(tmp_path, UKI)
    assert booted.verify("--expected", str(expected), "--expect-pcr", f"12={'11' * 32}") == 2
    assert "contradicts PCR 12" in capsys.readouterr().err
    assert booted.verify("--expected", str(expected), "--expect-measurement", "00" * 32) == 2
    assert "contradicts the measurement" in capsys.readouterr().err
    # An agreeing flag is fine.
    assert booted.verify("--expected", str(expected), "--expect-pcr", f"12={'00' * 32}") == 0


def test_a_tampered_expected_json_is_refused(
    make_embassy: EmbassyFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    booted = Booted(make_embassy, tmp_path, UKI)
    doc = json.loads(_expected_file(tmp_path, UKI).read_bytes())
    doc["measurement"]["policy"] = "00" * 32  # no longer hashes to its "measurement"
    tampered = tmp_path / "tampered.json"
    tampered.write_text(json.dumps(doc))
    assert booted.verify("--expected", str(tampered)) == 3
    assert "measurement" in capsys.readouterr().err


def test_insecure_any_boot_accepts_and_says_so(
    make_embassy: EmbassyFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    booted = Booted(make_embassy, tmp_path, OTHER_UKI)
    flags = ("--expect-measurement", MEASUREMENT.digest.hex(), "--insecure-any-boot")
    assert booted.verify(*flags) == 0
    assert "insecure_any_boot" in caplog.text
