"""Pure TPM 2.0 evidence handling: parse and check quotes, public areas, EK certificates.

Nothing here talks to a TPM. The verifier and the daemon share these functions, so a quote
the daemon emits is checked by exactly the code an auditor runs.
"""
