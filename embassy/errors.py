"""The one exception tree of the embassy.

Every failure the embassy reports is an :class:`EmbassyError`. Each class carries a stable,
machine-readable ``code`` (kebab-case) that appears in JSON error bodies and in the
verifier's JSON report. The mapping to HTTP statuses lives only in
``embassy.daemon.http`` and the mapping to exit codes only in ``embassy.cli``.

::

    EmbassyError
    ├── ConfigError                  bad config file or value (the key's path is in the message)
    ├── WireFormatError              bytes that do not parse as the versioned format they claim
    │   ├── ImageFormatError         a PE/UKI the boot model cannot parse or does not cover
    │   └── WeightsFileError         an encrypted model file that is not what it claims
    │       ├── WeightsTruncatedError      shorter than its header says
    │       ├── WeightsWrongModelError     for another model id
    │       ├── WeightsWrongKeyError       for another key id, or the key does not open it
    │       ├── WeightsHeaderTamperedError its header's MAC does not check
    │       └── WeightsChunkTamperedError  a chunk (or the hidden table) does not authenticate
    ├── RequestError                 a well-formed request the API refuses
    │   ├── NotFoundError            no such route or object
    │   ├── MethodNotAllowedError
    │   ├── PayloadTooLargeError
    │   ├── ForbiddenError           the caller does not hold what the request needs (a session)
    │   ├── PayloadExpiredError      the payload's expiry has passed
    │   ├── WrongEmbassyError        the payload is for another embassy
    │   ├── WrongMeasurementError    the payload is for another embassy measurement (code, config)
    │   ├── WrongWorkloadError       the payload is for another workload (launch digest)
    │   ├── UnboundPayloadError      a payload envelope version that binds neither (v1)
    │   ├── UnsupportedSuiteError    the payload's HPKE suite is not one this embassy has
    │   ├── BadPayloadError          the payload does not unwrap (other key, tampered field)
    │   ├── RateLimitedError         too many requests of a costly kind (a TPM quote); retry later
    │   ├── JobRequestError          a job refused before it starts (no reply key, input too big)
    │   ├── ConflictError            the request contradicts stored state
    │   │   ├── PayloadReplayedError a payload opens once
    │   │   ├── InstructionReplayedError an authority's instruction is carried out once
    │   │   ├── WeightsSealedError   no weights-key release or denial is stated while sealed
    │   │   └── WeightsRequestError  no pending weights-key request answers the release
    │   │       ├── WeightsRequestUnknownError never made here, or forgotten (restart, bound)
    │   │       ├── WeightsRequestExpiredError older than its time to live
    │   │       └── WeightsRequestUsedError    answered already (a request is answered once)
    │   ├── WeightsReleaseError      a broker's release that does not answer the request
    │   │   ├── WeightsReleaseMismatchError for another model or key id than requested
    │   │   └── WeightsUnwrapError   does not unwrap: another embassy's, or a field changed
    │   └── InstructionError         an authority's instruction that is not carried out
    │       ├── InstructionUnsignedError  no authority's signature on it
    │       ├── InstructionSignatureError signed, but not by the authority it names
    │       ├── InstructionExpiredError   past its expiry, or for another embassy
    │       └── NotOwnerError             the authority does not own the capability
    ├── VerificationError            evidence that does not check; the verifier raises these
    │   ├── SignatureError           a DSSE or quote signature does not verify
    │   ├── QuoteError               a quote is malformed, of the wrong type, or over the wrong data
    │   ├── PcrMismatchError         replayed PCR values differ from the quoted ones
    │   ├── MeasurementMismatchError the embassy's measurement is not the one expected
    │   ├── LogIntegrityError        a gap, reorder, duplicate or fork in the statement log
    │   ├── FreshnessError           the quote is not over the caller's nonce
    │   ├── ClockError               a TPM clock or counter went backwards
    │   ├── CertificateError         the EK certificate does not chain to the named CA
    │   ├── KeyBindingError          a key does not match the one the evidence binds
    │   │   └── AkNotCertifiedError  an AK with no certificate chain and no live activation
    │   ├── TpmKindError             the tpm_mode claimed contradicts the EK certificate's kind
    │   ├── ResultMismatchError      an output, seal and unseal that do not belong together
    │   ├── WorkloadMismatchError    the workload is not the one pinned, or not the identity's
    │   ├── EmbassyRestartedError    the embassy restarted (or relaunched) within a result
    │   ├── DeadlineError            a session unsealed after its deadline
    │   ├── IncompleteLogError       a log shown complete has entries after its end
    │   ├── TimeWindowError          a result outside the user's own before/after evidence
    │   ├── SoftwareTpmError         software-TPM evidence without allow_software_tpm
    │   ├── ResultOpenError          a job's result that the user's reply key does not open
    │   │   ├── ResultWrongReplyKeyError  wrapped to another reply key
    │   │   ├── ResultWrongJobError       its key or ciphertext belongs to another job
    │   │   ├── ResultUnwrapError         the wrapped key does not unwrap (a field was changed)
    │   │   ├── ResultTamperedError       ciphertext digest differs or a chunk fails to authenticate
    │   │   └── ResultTruncatedError      the ciphertext stream is cut short
    │   ├── JobStoryError            a job's statements that do not tell a sealed, destroyed job
    │   └── DecisionLogError         a broker decision log with a gap, reorder, fork or bad entry
    ├── ActivationError              an activation file the intake rejects (a statement says why)
    │   ├── ActivationCorruptError   bad magic, version, header field or checksum
    │   ├── ActivationTruncatedError shorter than its header says
    │   ├── ActivationOversizedError larger than the configured limit
    │   ├── ActivationForeignError   not a regular file, or for a session that is not open
    │   └── ActivationSequenceError  a sequence number out of order for its session
    ├── PolicyError                  refused by policy (e.g. a workload that could lift its seal)
    ├── SealError                    the firewall could not be put in (or out of) the sealed state
    ├── WorkloadError                Docker failed to do what the embassy asked
    │   └── JobsBusyError            every job slot is taken (jobs.max_concurrent); retry later
    ├── JobFailedError               how a job ended without a result (its abort statement says)
    │   ├── JobDeadlineError         not committed by its deadline: killed
    │   ├── JobCrashedError          its container exited without a commit
    │   ├── JobOutputTooLargeError   its result is larger than jobs.max_output_bytes
    │   ├── JobBadCommitError        a commit that does not match the result in its spool
    │   └── JobInterruptedError      the daemon restarted while it ran
    ├── TpmError                     the TPM (or swtpm) failed or is unreachable
    │   └── BootStateChangedError    the master secret is sealed to boot PCRs that now differ
    └── StorageError                 durable state is unreadable or inconsistent
        ├── TamperError              durable state disagrees with the TPM: refuse to continue
        └── UnboundSealedKeyError    a sealed master secret without a PCR policy (old format)
"""

from __future__ import annotations


class EmbassyError(Exception):
    """Root of every error the embassy raises on purpose."""

    code = "embassy-error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(EmbassyError):
    code = "config-invalid"


class WireFormatError(EmbassyError):
    code = "malformed"


class ImageFormatError(WireFormatError):
    code = "image-malformed"


class WeightsFileError(WireFormatError):
    """An encrypted model file (``workload_sdk.weights``) that does not parse; its subclasses
    name the check that failed. The codes are the SDK's ``WeightsError`` codes."""

    code = "weights-malformed"


class WeightsTruncatedError(WeightsFileError):
    code = "weights-truncated"


class WeightsWrongModelError(WeightsFileError):
    code = "weights-wrong-model"


class WeightsWrongKeyError(WeightsFileError):
    code = "weights-wrong-key"


class WeightsHeaderTamperedError(WeightsFileError):
    code = "weights-header-tampered"


class WeightsChunkTamperedError(WeightsFileError):
    code = "weights-chunk-tampered"


class RequestError(EmbassyError):
    code = "bad-request"


class NotFoundError(RequestError):
    code = "not-found"


class MethodNotAllowedError(RequestError):
    code = "method-not-allowed"


class PayloadTooLargeError(RequestError):
    code = "payload-too-large"


class ForbiddenError(RequestError):
    code = "forbidden"


class PayloadExpiredError(RequestError):
    code = "payload-expired"


class WrongEmbassyError(RequestError):
    code = "wrong-embassy"


class WrongMeasurementError(RequestError):
    code = "payload-wrong-measurement"


class WrongWorkloadError(RequestError):
    code = "payload-wrong-workload"


class UnboundPayloadError(RequestError):
    code = "payload-unbound"


class UnsupportedSuiteError(RequestError):
    code = "unsupported-suite"


class BadPayloadError(RequestError):
    code = "bad-payload"


class RateLimitedError(RequestError):
    code = "rate-limited"


class ConflictError(RequestError):
    code = "conflict"


class PayloadReplayedError(ConflictError):
    code = "payload-replayed"


class InstructionReplayedError(ConflictError):
    code = "instruction-replayed"


class WeightsSealedError(ConflictError):
    """A broker's release or denial handed over while the workload is sealed: its statement
    would carry workload-chosen ids out of the seal, so it waits for the session's end."""

    code = "weights-workload-sealed"


class WeightsRequestError(ConflictError):
    code = "weights-request-refused"


class WeightsRequestUnknownError(WeightsRequestError):
    code = "weights-request-unknown"


class WeightsRequestExpiredError(WeightsRequestError):
    code = "weights-request-expired"


class WeightsRequestUsedError(WeightsRequestError):
    code = "weights-request-used"


class WeightsReleaseError(RequestError):
    code = "weights-release-refused"


class WeightsReleaseMismatchError(WeightsReleaseError):
    code = "weights-release-mismatch"


class WeightsUnwrapError(WeightsReleaseError):
    code = "weights-release-unwrap"


class InstructionError(RequestError):
    code = "instruction-refused"


class InstructionUnsignedError(InstructionError):
    code = "instruction-unsigned"


class InstructionSignatureError(InstructionError):
    code = "instruction-bad-signature"


class InstructionExpiredError(InstructionError):
    code = "instruction-expired"


class NotOwnerError(InstructionError):
    code = "not-capability-owner"


class VerificationError(EmbassyError):
    code = "verification-failed"


class SignatureError(VerificationError):
    code = "bad-signature"


class QuoteError(VerificationError):
    code = "bad-quote"


class PcrMismatchError(VerificationError):
    code = "pcr-mismatch"


class MeasurementMismatchError(VerificationError):
    code = "measurement-mismatch"


class LogIntegrityError(VerificationError):
    code = "log-integrity"


class FreshnessError(VerificationError):
    code = "stale-nonce"


class ClockError(VerificationError):
    code = "clock-backwards"


class CertificateError(VerificationError):
    code = "bad-ek-certificate"


class KeyBindingError(VerificationError):
    code = "key-binding"


class AkNotCertifiedError(KeyBindingError):
    """An AK with neither a certificate chain to a trusted AK CA nor a live activation."""

    code = "ak-not-certified"


class TpmKindError(VerificationError):
    """The embassy's ``tpm_mode`` claim contradicts the TPM kind its evidence proves."""

    code = "tpm-kind-contradiction"


class ResultMismatchError(VerificationError):
    code = "result-mismatch"


class WorkloadMismatchError(VerificationError):
    code = "workload-mismatch"


class EmbassyRestartedError(VerificationError):
    code = "embassy-restarted"


class DeadlineError(VerificationError):
    code = "deadline-passed"


class IncompleteLogError(VerificationError):
    code = "log-incomplete"


class TimeWindowError(VerificationError):
    code = "outside-time-window"


class SoftwareTpmError(VerificationError):
    code = "software-tpm"


class ResultOpenError(VerificationError):
    """A job's encrypted result (``embassy.jobs.result``) that does not open; the subclasses
    name why."""

    code = "result-unopened"


class ResultWrongReplyKeyError(ResultOpenError):
    code = "result-wrong-reply-key"


class ResultWrongJobError(ResultOpenError):
    code = "result-wrong-job"


class ResultUnwrapError(ResultOpenError):
    code = "result-key-unwrap"


class ResultTamperedError(ResultOpenError):
    code = "result-tampered"


class ResultTruncatedError(ResultOpenError):
    code = "result-truncated"


class DecisionLogError(VerificationError):
    """A key broker's decision log that does not verify. ``reason`` names how: ``gap``,
    ``reorder``, ``duplicate``, ``fork``, ``changed``, ``chain``, ``signature``, ``malformed``."""

    code = "decision-log"

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


class ActivationError(EmbassyError):
    code = "activation-rejected"


class ActivationCorruptError(ActivationError):
    code = "activation-corrupt"


class ActivationTruncatedError(ActivationError):
    code = "activation-truncated"


class ActivationOversizedError(ActivationError):
    code = "activation-oversized"


class ActivationForeignError(ActivationError):
    code = "activation-foreign"


class ActivationSequenceError(ActivationError):
    code = "activation-out-of-sequence"


class JobRequestError(RequestError):
    code = "job-refused"


class JobStoryError(VerificationError):
    code = "job-story-broken"


class JobFailedError(EmbassyError):
    code = "job-failed"


class JobDeadlineError(JobFailedError):
    code = "job-deadline"


class JobCrashedError(JobFailedError):
    code = "job-crashed"


class JobOutputTooLargeError(JobFailedError):
    code = "job-output-too-large"


class JobBadCommitError(JobFailedError):
    code = "job-bad-commit"


class JobInterruptedError(JobFailedError):
    code = "job-interrupted"


class PolicyError(EmbassyError):
    code = "policy-refused"


class SealError(EmbassyError):
    code = "seal-failed"


class WorkloadError(EmbassyError):
    code = "workload-error"


class JobsBusyError(WorkloadError):
    code = "jobs-busy"


class TpmError(EmbassyError):
    code = "tpm-error"


class BootStateChangedError(TpmError):
    code = "sealed-boot-changed"


class StorageError(EmbassyError):
    code = "storage-error"


class TamperError(StorageError):
    code = "tamper-detected"


class UnboundSealedKeyError(StorageError):
    code = "sealed-key-unbound"
