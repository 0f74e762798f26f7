from __future__ import annotations

from pathlib import Path

import pytest

from embassy.sessions.replay import PayloadReplayedError, ReplayStore


def test_a_payload_opens_once_even_across_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "payloads.sqlite"
    store = ReplayStore(path)
    store.claim(b"\x01" * 16, b"\xaa" * 16, 100)
    store.claim(b"\x02" * 16, b"\xbb" * 16, 101)
    with pytest.raises(PayloadReplayedError, match="already opened") as info:
        store.claim(b"\x01" * 16, b"\xcc" * 16, 102)
    assert info.value.code == "payload-replayed"
    assert ("aa" * 16) in info.value.message
    store.close()
    reopened = ReplayStore(path)  # a restarted daemon
    with pytest.raises(PayloadReplayedError):
        reopened.claim(b"\x02" * 16, b"\xdd" * 16, 103)
    reopened.claim(b"\x03" * 16, b"\xdd" * 16, 103)
    reopened.close()
    assert oct(path.stat().st_mode & 0o777) == "0o600"
