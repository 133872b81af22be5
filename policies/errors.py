"""Errors of the policy domain (store, lifecycle, audit, principals).

Each knows how it is shown: ``http_status`` for the API (problem+json), ``exit_code`` for
the CLI (1 for every failure here; usage/input errors are ``InputError`` with 2)::

    ExitwiseError (calibration.exceptions)
    └── PolicyError                                           500 / 1
        ├── NotFound(LookupError)           no such model/version/principal        404
        ├── InvalidTransition(ValueError)   lifecycle forbids it (draft -> active)  409
        │   ├── WeakerPolicy                weaker promises, not accepted           409
        │   └── CertificateMismatch         re-verification contradicts the claim   409
        ├── Conflict                        clashes with stored state              409
        │   ├── DuplicateContent            same content already stored            409
        │   └── ImmutableContent            policy content/audit rows never change 409
        ├── AuthError                       no or unknown/disabled bearer token    401
        ├── Forbidden(PermissionError)      authenticated, but the role is too low 403
        │   └── FourEyesViolation           approver is the author                 403
        ├── StoreUnavailable                database unreachable/busy/dropped      503
        │   └── SchemaOutOfDate             revision is not head                   503
        └── AuditChainBroken                verify found a broken link             500

``FourEyesViolation`` is a 403, not a 409: the version is in a state that *can* be
approved, only not by this principal; another approver making the same request succeeds.
"""

from __future__ import annotations

from exitwise.calibration.exceptions import ExitwiseError, InputError


class PolicyError(ExitwiseError):
    """Root of the policy-domain errors."""

    title = "Policy store error"


class NotFound(PolicyError, LookupError):
    http_status = 404
    title = "Not found"


class InvalidTransition(PolicyError, ValueError):
    http_status = 409
    title = "Invalid lifecycle transition"


class WeakerPolicy(InvalidTransition):
    """The version drops or loosens promises of the versions it replaces; ``weakened`` names them.

    Approving it anyway needs an explicit, audited reason (``--accept-weaker``).
    """

    title = "Weaker policy"

    def __init__(self, message: str, *, weakened: list[str] | tuple[str, ...] = ()):
        super().__init__(message)
        self.errors = [("guarantee", w) for w in weakened]


class CertificateMismatch(InvalidTransition):
    """The service re-ran the certification from the version's evidence and it does not hold."""

    title = "Certificate does not hold"


class Conflict(PolicyError):
    http_status = 409
    title = "Conflict"


class DuplicateContent(Conflict):
    """The same content is already stored for this model; ``existing`` is its version number."""

    title = "Duplicate policy content"

    def __init__(self, message: str, *, model: str, existing: int):
        super().__init__(message)
        self.model = model
        self.existing = existing


class ImmutableContent(Conflict):
    title = "Immutable content"


class AuthError(PolicyError):
    http_status = 401
    title = "Unauthenticated"


class Forbidden(PolicyError, PermissionError):
    http_status = 403
    title = "Forbidden"


class FourEyesViolation(Forbidden):
    title = "Four-eyes rule"


class StoreUnavailable(PolicyError):
    http_status = 503
    title = "Policy store unavailable"


class SchemaOutOfDate(StoreUnavailable):
    title = "Database schema out of date"


class AuditChainBroken(PolicyError):
    http_status = 500
    title = "Audit chain broken"


ALL_ERRORS: tuple[type[PolicyError], ...] = (
    PolicyError, NotFound, InvalidTransition, WeakerPolicy, CertificateMismatch, Conflict, DuplicateContent,
    ImmutableContent, AuthError,
    Forbidden, FourEyesViolation, StoreUnavailable, SchemaOutOfDate, AuditChainBroken,
)


class UnsupportedMediaType(InputError):
    """A request body in a format the endpoint does not read (415; CLI exit code 2)."""

    http_status = 415
    title = "Unsupported media type"
