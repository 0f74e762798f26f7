"""Encrypted model weights: the file format, its encryption, and the key release."""
