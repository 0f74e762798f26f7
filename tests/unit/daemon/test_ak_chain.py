"""The AK certificate chain the daemon serves: checked, kept, and not the workload's to set."""

from __future__ import annotations

from typing import Any

import pytest

from embassy.daemon.ak_chain import AK_CHAIN_FILE
from embassy.daemon.runtime import Embassy
from embassy.errors import ForbiddenError, KeyBindingError, WireFormatError
from embassy.wire.codec import b64encode
from tests.fakes import FakeTpm, ak_chain_for
from tests.unit.conftest import REGISTRAR, EmbassyFactory
from tests.unit.verify.conftest import start_with_workload


def test_the_chain_survives_a_restart(make_embassy: EmbassyFactory, tpm: FakeTpm) -> None:
    first = make_embassy(tpm, "e")
    chain = first.identity_document()["ak_certificates"]
    assert chain == [b64encode(c) for c in ak_chain_for(tpm, REGISTRAR)]
    make_embassy.crash(first)
    again = make_embassy(tpm, "e", certify_ak=False)
    assert again.identity_document()["ak_certificates"] == chain


def test_a_stored_chain_for_another_ak_is_not_served(
    make_embassy: EmbassyFactory, tpm: FakeTpm, caplog: pytest.LogCaptureFixture
) -> None:
    first = make_embassy(tpm, "e")
    make_embassy.crash(first)
    # The chain on disk is now another TPM's (a restored backup, a swapped TPM).
    other = ak_chain_for(FakeTpm(b"other"), REGISTRAR)
    path = first.config.data_dir / AK_CHAIN_FILE
    path.write_bytes(b'{"ak_certificates":["%s"],"v":1}' % b64encode(other[0]).encode())
    again = make_embassy(tpm, "e", certify_ak=False)
    assert again.identity_document()["ak_certificates"] == []
    assert "is not served" in caplog.text


def test_install_refuses_a_chain_for_another_ak(embassy: Embassy) -> None:
    before = embassy.identity_document()["ak_certificates"]
    with pytest.raises(KeyBindingError):
        embassy.install_ak_chain(ak_chain_for(FakeTpm(b"other"), REGISTRAR), None)
    with pytest.raises(WireFormatError):
        embassy.install_ak_chain([b"\x30\x00"], None)
    assert embassy.identity_document()["ak_certificates"] == before


def test_the_workload_cannot_install_a_chain(
    make_embassy: EmbassyFactory, tpm: FakeTpm, monkeypatch: pytest.MonkeyPatch
) -> None:
    embassy = start_with_workload(make_embassy, tpm)
    before = embassy.identity_document()["ak_certificates"]
    assert embassy.workload is not None
    monkeypatch.setattr(embassy.workload, "is_own_process", lambda peer: True)
    peer: Any = object()
    with pytest.raises(ForbiddenError, match="from the host"):
        embassy.install_ak_chain(ak_chain_for(tpm, REGISTRAR), peer)
    assert embassy.identity_document()["ak_certificates"] == before
