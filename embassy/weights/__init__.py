"""Encrypted model weights: the owner's side (``embassy weights encrypt``, ``inspect``).

The file format is defined once, in :mod:`workload_sdk.weights` (it runs in the workload,
which loads the file); :mod:`embassy.weights.format` gives the embassy its errors and the
header the owner writes, :mod:`embassy.weights.encrypt` turns a safetensors file into one.
"""
