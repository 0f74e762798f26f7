"""The sealed input's payload envelope (docs/protocol.md, section 2)."""
