"""Write docs/config.md from embassy.config.SCHEMA; with --check, fail if it is stale."""

from __future__ import annotations

import sys
from pathlib import Path

from embassy.config import render_docs

TARGET = Path(__file__).resolve().parent.parent / "docs" / "config.md"


def main(argv: list[str]) -> int:
    text = render_docs()
    if "--check" in argv:
        if not TARGET.exists() or TARGET.read_text() != text:
            sys.stderr.write(f"{TARGET} is stale: run python scripts/gen_config_docs.py\n")
            return 1
        return 0
    TARGET.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
