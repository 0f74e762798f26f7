"""Encrypted model weights: the file format, its encryption, and the key release.

The file format is defined once, in :mod:`workload_sdk.weights` (it runs in the workload,
which loads the file); :mod:`embassy.weights.format` gives the embassy its errors and the
header the owner writes, :mod:`embassy.weights.encrypt` turns a safetensors file into one
(``embassy weights encrypt``), :mod:`embassy.weights.release` is the key's release.
"""
