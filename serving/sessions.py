"""Open propagation streams of one replica: bounded in number, closed after an idle timeout.

Streams live in replica memory, so every request of a session must reach the replica that opened it: the app
routes on Ray Serve's multiplexing header (`serve_multiplexed_model_id: <session id>`), which sends requests to the
replica that reported that id, and a WebSocket stream is pinned to one replica for its lifetime anyway.
A full store refuses new sessions (429) rather than evicting a stream someone is still using.
"""

from __future__ import annotations

import asyncio
import secrets
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
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one frame at a time per stream


class SessionStore:
    def __init__(self, max_sessions: int, idle_timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_sessions, self.idle_timeout_s, self.clock = max_sessions, idle_timeout_s, clock
        self.sessions: dict[str, Session] = {}

    def expire(self) -> int:
        """Drop sessions idle for longer than the timeout; returns how many."""
        cutoff = self.clock() - self.idle_timeout_s
        idle = [sid for sid, s in self.sessions.items() if s.last_used < cutoff and not s.lock.locked()]
        for sid in idle:
            del self.sessions[sid]
        return len(idle)

    def add(self, stream: Any, session_id: str | None = None) -> Session:
        self.expire()
        if len(self.sessions) >= self.max_sessions:
            raise RequestError(
                429,
                f"{len(self.sessions)} propagation sessions are open (the limit is {self.max_sessions}); close one "
                f"(DELETE) or wait for an idle one to expire after {self.idle_timeout_s:.0f}s",
            )
        session = Session(session_id or secrets.token_urlsafe(12), stream, self.clock())
        self.sessions[session.id] = session
        return session

    def get(self, session_id: str) -> Session:
        self.expire()
        session = self.sessions.get(session_id)
        if session is None:
            raise RequestError(404, f"no open session {session_id!r} (never opened, closed, or idle-expired)")
        session.last_used = self.clock()
        return session

    def close(self, session_id: str) -> None:
        if self.sessions.pop(session_id, None) is None:
            raise RequestError(404, f"no open session {session_id!r}")

    def __len__(self) -> int:
        return len(self.sessions)
