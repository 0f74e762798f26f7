"""The daemon: thin adapters (TPM, files, socket) around the pure core."""
