"""Open propagation streams of one session host: bounded in number, closed after an idle timeout.

The store lives in a session host (serving/session_host.py), a Ray actor each replica owns, so a session's memory
stays in one process while any replica can reach it: the session id names its host. The host runs calls on several
threads, so the store guards its dict with a lock and each session carries its own lock (one frame at a time per
stream, in arrival order). A full store refuses new sessions (429) rather than evicting a stream someone is still
using.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from serving.errors import RequestError


@dataclass
class Session:
    id: str
    stream: Any  # serving.propagation.Stream
    last_used: float
    lock: threading.Lock = field(default_factory=threading.Lock)  # one frame at a time per stream


class SessionStore:
    def __init__(self, max_sessions: int, idle_timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_sessions, self.idle_timeout_s, self.clock = max_sessions, idle_timeout_s, clock
        self.sessions: dict[str, Session] = {}
        self._guard = threading.RLock()  # the dict, across the host's threads (re-entered: add/get call expire)

    def expire(self) -> int:
        """Drop sessions idle for longer than the timeout (never one running a frame); returns how many."""
        with self._guard:
            cutoff = self.clock() - self.idle_timeout_s
            idle = [sid for sid, s in self.sessions.items() if s.last_used < cutoff and not s.lock.locked()]
            for sid in idle:
                del self.sessions[sid]
            return len(idle)

    def add(self, stream: Any, session_id: str | None = None) -> Session:
        with self._guard:
            self.expire()
            if len(self.sessions) >= self.max_sessions:
                raise RequestError(
                    429,
                    f"{len(self.sessions)} propagation sessions are open (the limit is {self.max_sessions}); close "
                    f"one (DELETE) or wait for an idle one to expire after {self.idle_timeout_s:.0f}s",
                )
            session = Session(session_id or secrets.token_urlsafe(12), stream, self.clock())
            self.sessions[session.id] = session
            return session

    def get(self, session_id: str) -> Session:
        with self._guard:
            self.expire()
            session = self.sessions.get(session_id)
            if session is None:
                raise RequestError(404, f"no open session {session_id!r} (never opened, closed, or idle-expired)")
            session.last_used = self.clock()
            return session

    def close(self, session_id: str) -> None:
        with self._guard:
            if self.sessions.pop(session_id, None) is None:
                raise RequestError(404, f"no open session {session_id!r}")

    def __len__(self) -> int:
        return len(self.sessions)
