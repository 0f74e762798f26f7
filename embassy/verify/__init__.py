"""The auditor's verifier: pure Python, no TPM, no root, no Docker.

Every function here returns a value describing what was proved, or raises a precise
:class:`embassy.errors.VerificationError` (or ``WireFormatError`` for unparsable input).
"""
