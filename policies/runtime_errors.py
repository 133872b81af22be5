"""The errors the runtime client raises to its caller (standard library only)."""

from __future__ import annotations

__all__ = ["PolicyAuthError", "PolicyClientError", "PolicyRejected"]


class PolicyClientError(Exception):
    """Base class of the errors the runtime client raises to its caller."""


class PolicyAuthError(PolicyClientError):
    """The policy server refused the client's token (401/403) and the client has no policy to keep."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class PolicyRejected(PolicyClientError, ValueError):
    """A policy body that must not be used; ``reason`` is a short code (for counters and logs)."""

    def __init__(self, message: str, reason: str = "invalid") -> None:
        super().__init__(message)
        self.reason = reason
