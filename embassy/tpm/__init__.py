"""Adapters to a real TPM 2.0: a device node or a swtpm the daemon starts itself."""
