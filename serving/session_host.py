"""Session hosts: where propagation streams live, so that any replica can serve any session's requests.

A stream's memory (keys and values of earlier frames) is process state, but a session's requests may land on any
replica: HAProxy balances each request on its own, and Ray's proxy routes without knowing sessions. So each replica
owns one session host, a plain Ray actor holding a SessionStore and the OnnxPropagator new streams start on. It is
named `endoflow-sessions-<uuid>` in the NAMESPACE, and the session ids it hands out are `<host name>.<random>`:
whichever replica receives a request looks the host up by that name (handles cached) and forwards the call.

The host is not detached: its owner is the replica that created it, so it dies with that replica, as the sessions
did when they lived in the replica itself. A session whose host is gone answers 410 naming it; an unknown, closed or
idle-expired one 404. It takes no Ray CPU (the replica reserves the CPUs its requests need and waits while the host
computes) and is pinned to the replica's node, where the graphs were resolved.

Concurrency: a threaded actor (max_concurrency > 1), so streams of different sessions step in parallel as they did
in the replica's thread pool; each session's own lock (serving/sessions.py) keeps its frames one at a time, in the
order they arrive, and the store's lock guards the session table.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import ray
from ray.exceptions import RayActorError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from serving.errors import RequestError
from serving.onnx_model import Provider
from serving.propagation import OnnxPropagator, Stream
from serving.resolve import ResolvedModel
from serving.sessions import SessionStore

NAMESPACE = "endoflow-sessions"
PREFIX = "endoflow-sessions-"
MAX_THREADS = 64  # the host's calls in flight at once: sessions stepping in parallel, plus open/close/count
log = logging.getLogger("ray.serve")


class SessionHost:
    """The actor's class (also usable in-process, e.g. in tests). Every method is called on one of its threads."""

    def __init__(
        self,
        name: str,
        graphs: dict[str, ResolvedModel],
        providers: Sequence[Provider],
        threads: int | None,
        max_sessions: int,
        idle_timeout_s: float,
    ) -> None:
        self.name, self.providers, self.threads = name, list(providers), threads
        self.propagator = OnnxPropagator(graphs, self.providers, threads)
        self.store = SessionStore(max_sessions, idle_timeout_s)

    def version(self) -> str:
        """The propagation version new streams start on (also: the host is up)."""
        return self.propagator.version

    def swap(self, graphs: dict[str, ResolvedModel]) -> str:
        """New streams start on `graphs`; open ones keep the propagator they were opened with (Stream.model)."""
        self.propagator = OnnxPropagator(graphs, self.providers, self.threads)
        return self.propagator.version

    def open(self, frame_hw3: np.ndarray, mask_hw: np.ndarray) -> dict[str, Any]:
        stream = Stream(self.propagator, frame_hw3, mask_hw)  # one read of the attribute: a swap cannot split it
        session = self.store.add(stream, f"{self.name}.{secrets.token_urlsafe(12)}")
        return {"session": session.id, "objects": stream.objects, "idle_timeout_s": self.store.idle_timeout_s}

    def step(self, session_id: str, frame_hw3: np.ndarray) -> np.ndarray:
        session = self.store.get(session_id)
        with session.lock:  # frames of one stream in order, one at a time
            labels = session.stream.step(frame_hw3)
        session.last_used = self.store.clock()  # a slow frame does not count as idle time
        return labels

    def close(self, session_id: str) -> None:
        self.store.close(session_id)

    def count(self) -> int:
        self.store.expire()
        return len(self.store)


_RemoteHost = ray.remote(SessionHost)


def start_host(
    graphs: dict[str, ResolvedModel],
    providers: Sequence[Provider],
    threads: int | None,
    max_sessions: int,
    idle_timeout_s: float,
    ready_timeout_s: float = 120.0,
) -> tuple[str, Any]:
    """Create this process's session host (owned by the caller, on its node) and wait until it serves."""
    name = f"{PREFIX}{uuid.uuid4().hex}"
    node = ray.get_runtime_context().get_node_id()
    handle = _RemoteHost.options(
        name=name,
        namespace=NAMESPACE,
        num_cpus=0,
        max_concurrency=min(max_sessions, MAX_THREADS - 4) + 4,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
    ).remote(name, graphs, list(providers), threads, max_sessions, idle_timeout_s)
    # future().result, not ray.get: callers are threads of an async actor (the replica), where ray.get warns.
    handle.version.remote().future().result(timeout=ready_timeout_s)
    return name, handle


class HostGone(Exception):
    """The host actor died (its replica stopped or crashed): the sessions it held are lost."""


@contextmanager
def _host_errors() -> Iterator[None]:
    """A host's RequestErrors come back as themselves, a dead host as HostGone."""
    try:
        yield
    except RayTaskError as err:
        if isinstance(err.cause, RequestError):
            raise err.cause from None
        raise
    except RayActorError as err:
        raise HostGone(str(err)) from err


async def invoke(handle: Any, method: str, *args: Any) -> Any:
    """Call a host from the event loop."""
    with _host_errors():
        return await getattr(handle, method).remote(*args)


def call_sync(handle: Any, method: str, *args: Any, timeout_s: float = 300.0) -> Any:
    """`invoke` for plain threads (the reload loop)."""
    with _host_errors():
        return getattr(handle, method).remote(*args).future().result(timeout=timeout_s)


class HostDirectory:
    """Session id -> its host's handle (looked up by name once, then cached), and calls on it."""

    def __init__(self) -> None:
        self.handles: dict[str, Any] = {}

    def remember(self, name: str, handle: Any) -> None:
        self.handles[name] = handle

    def forget(self, name: str) -> None:
        self.handles.pop(name, None)

    @staticmethod
    def host_name(session_id: str) -> str:
        name, dot, token = session_id.rpartition(".")
        if not (dot and token and name.startswith(PREFIX)):
            raise RequestError(404, f"no open session {session_id!r} (never opened, closed, or idle-expired)")
        return name

    async def call(self, session_id: str, method: str, *args: Any) -> Any:
        name = self.host_name(session_id)
        gone = RequestError(
            410, f"session {session_id!r} is gone: the replica that held its memory stopped; open a new session"
        )
        handle = self.handles.get(name)
        if handle is None:
            try:
                handle = await asyncio.to_thread(ray.get_actor, name, NAMESPACE)
            except ValueError:  # no such actor (any more): ids are only minted by live hosts
                raise gone from None
            self.handles[name] = handle
        try:
            return await invoke(handle, method, session_id, *args)
        except HostGone:
            self.forget(name)
            raise gone from None


class ReplicaHost:
    """This replica's own session host, where the streams it opens live: started with the propagation graphs,
    swapped when they move, and replaced if it died (crash, OOM), its sessions lost."""

    def __init__(
        self,
        directory: HostDirectory,
        providers: Sequence[Provider],
        threads: int | None,
        max_sessions: int,
        idle_timeout_s: float,
    ) -> None:
        self.directory = directory
        self.providers, self.threads = providers, threads
        self.max_sessions, self.idle_timeout_s = max_sessions, idle_timeout_s
        self.name: str | None = None
        self.handle: Any = None  # None: no propagation model, no host
        self.lock = threading.Lock()  # one replacement at a time

    def start(self, graphs: dict[str, ResolvedModel]) -> None:
        name, handle = start_host(graphs, self.providers, self.threads, self.max_sessions, self.idle_timeout_s)
        self.directory.remember(name, handle)
        self.name, self.handle = name, handle

    def _replace(self, graphs: dict[str, ResolvedModel]) -> None:  # the caller holds self.lock
        if self.name is not None:
            self.directory.forget(self.name)
        self.start(graphs)

    async def open(
        self, frame_hw3: np.ndarray, mask_hw: np.ndarray, graphs: Callable[[], dict[str, ResolvedModel]]
    ) -> dict[str, Any]:
        """Open a stream here; a host that died is replaced once, on the graphs `graphs()` names then."""
        handle = self.handle
        try:
            return await invoke(handle, "open", frame_hw3, mask_hw)
        except HostGone:
            log.warning("session host %s died (its sessions are lost); starting a new one", self.name)

        def replace() -> None:
            with self.lock:
                if self.handle is handle:  # not already replaced by a concurrent request
                    self._replace(graphs())

        await asyncio.to_thread(replace)
        return await invoke(self.handle, "open", frame_hw3, mask_hw)

    def swap(self, graphs: dict[str, ResolvedModel]) -> None:
        """New streams start on `graphs` (from a plain thread: the reload loop); a dead host is replaced on them."""
        try:
            call_sync(self.handle, "swap", graphs)
        except HostGone:
            log.warning("the session host died; starting a new one on the moved graphs")
            with self.lock:
                self._replace(graphs)

    async def count(self) -> int:
        """Sessions this host holds (opened here, served from anywhere); 0 once it died."""
        try:
            return await invoke(self.handle, "count")
        except HostGone:
            return 0
