"""What the runtime client reports to operators (standard library only).

:class:`ClientStatus` is :meth:`exitwise.policies.runtime.PolicyClient.status`'s answer;
:class:`ExitCounter` counts the rows ``RuntimePolicy.decide`` decided and stopped at each exit,
for :meth:`exitwise.policies.runtime.PolicyClient.counters`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Literal

__all__ = ["ClientStatus", "ExitCounter", "Outcome", "Source"]

Source = Literal["server", "disk", "fallback"]
Outcome = Literal["updated", "not_modified", "unavailable", "unauthorized", "rejected", "no_active_policy"]


@dataclass(frozen=True)
class ClientStatus:
    """What the client is doing now, for health checks and dashboards (:meth:`PolicyClient.status`).

    ``policy_age_s``: seconds since the policy in use was served (a disk copy: served and saved),
    None on the fallback. ``on_fallback_since``: epoch seconds since when every early exit is
    refused, None while a policy is in use. ``last_success``: epoch seconds of the last poll the
    server answered (200, 304 or "no active policy"). ``consecutive_failures``: polls in a row
    that were unavailable, unauthorized or rejected. ``fallback_alarm``: on the fallback for
    ``fallback_alarm_after`` seconds or more. ``shadow_pending``: shadow rows held for upload;
    ``shadow_last_error``: why the last shadow upload failed (None once one succeeds).
    """

    source: Source
    version: int | None
    killed: bool
    content_hash: str | None
    policy_age_s: float | None
    on_fallback_since: float | None
    last_outcome: Outcome | None
    last_status: int | None
    last_detail: str | None
    last_success: float | None
    consecutive_failures: int
    fallback_alarm: bool = False
    shadow_pending: int = 0
    shadow_last_error: str | None = None


class ExitCounter:
    """Rows decided and rows that stopped, per exit index; thread-safe (one short lock per call).

    A client shares one counter with every snapshot it installs, so the totals span refreshes.
    """

    __slots__ = ("_decided", "_exited", "_lock")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._decided: dict[int, int] = {}
        self._exited: dict[int, int] = {}

    def add(self, exit_index: int, rows: int, exited: int) -> None:
        """``rows`` were decided at ``exit_index`` and ``exited`` of them stopped there."""
        with self._lock:
            self._decided[exit_index] = self._decided.get(exit_index, 0) + rows
            self._exited[exit_index] = self._exited.get(exit_index, 0) + exited

    def snapshot(self) -> tuple[dict[int, int], dict[int, int]]:
        """(rows decided, rows stopped) per exit index, in exit order."""
        with self._lock:
            return dict(sorted(self._decided.items())), dict(sorted(self._exited.items()))
