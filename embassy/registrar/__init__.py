"""The registrar: a privacy CA that vouches, offline, that an AK lives in a certified TPM.

``ca`` keeps the registrar's signing key (encrypted at rest); ``enroll`` checks an embassy's
EK certificate, runs credential activation with it and issues the AK certificate
(:mod:`embassy.attest.akcert`).
"""
