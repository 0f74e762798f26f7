"""The embassy: seals, meters and attests a secret inference workload."""

__version__ = "0.1.0"
