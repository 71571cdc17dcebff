"""Start (or join) Ray for one command and leave nothing behind.

Ray 2.60 turns on token auth and, by default, writes the token under $HOME and its session files under the system
temp directory. A local run here gets an in-memory token (one per process) and a private temp directory that is
removed on exit, so repeated runs and tests never see each other's state. With `address` (or RAY_ADDRESS) set, we
only connect.
SIGTERM (`kill`, systemd, a container runtime) unwinds like Ctrl-C while that local Ray runs: the native handler
ray.init installs ends the process mid-cleanup and leaves the raylet, the GCS and Serve's HAProxy running, still
holding their ports.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator

# One token per process, not per local_ray: Ray loads the token once per process and keeps it, so a second local Ray
# started with a new one fails to start its GCS (InvalidAuthToken), as `bench-propagate --ensemble 3` did.
_PROCESS_TOKEN = secrets.token_hex(32)


@contextlib.contextmanager
def local_ray(num_cpus: int | None = None, address: str | None = None) -> Iterator[dict]:
    import ray  # here, not at the top: free_port and exit_on_sigterm serve callers that never start Ray

    address = address or os.environ.get("RAY_ADDRESS") or None
    if ray.is_initialized():
        yield {"reused": True}
        return
    if address:
        ray.init(address=address, log_to_driver=True)
        try:
            yield {"address": address}
        finally:
            ray.shutdown()
        return

    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    os.environ["RAY_AUTH_TOKEN"] = _PROCESS_TOKEN
    # Unix socket paths are limited to ~107 bytes, so the session dir stays short and under /tmp.
    temp_dir = tempfile.mkdtemp(prefix="efray-", dir="/tmp")
    restore_sigterm = None
    try:
        ray.init(
            num_cpus=num_cpus or os.cpu_count(),
            _temp_dir=temp_dir,
            include_dashboard=True,  # Ray Train v2 polls the state API, which the dashboard serves
            dashboard_host="127.0.0.1",
            log_to_driver=True,  # rank-0 progress lines from the training workers
            configure_logging=True,
            logging_level="WARNING",
        )
        # After ray.init: its core worker installs a native SIGTERM handler that ends the process mid-cleanup.
        restore_sigterm = exit_on_sigterm()
        yield {"temp_dir": temp_dir}
    finally:
        with contextlib.suppress(Exception):
            from ray import serve

            serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
        if restore_sigterm is not None:
            restore_sigterm()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def exit_on_sigterm() -> Callable[[], None]:
    """Turn SIGTERM into SystemExit(143), so `finally` blocks run; -> a function that puts the old handler back.
    Only the main thread may set signal handlers: elsewhere this changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.getsignal(signal.SIGTERM)  # None: set outside Python (Ray's native handler)

    def exit_cleanly(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, exit_cleanly)
    return lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


# Neither the kernel's ephemeral range (32768-60999 by default), where Ray's processes bind port 0 while they start,
# nor Ray's worker ports (10002-19999) nor Serve's replica ports (30000-31000): a port picked here before Ray starts
# is still free when the proxy or HAProxy binds it.
QUIET_PORTS = range(20000, 30000)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, from QUIET_PORTS."""
    for port in random.sample(QUIET_PORTS, 200):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free TCP port in {QUIET_PORTS.start}-{QUIET_PORTS.stop - 1} on 127.0.0.1")


def free_port_block(size: int, avoid: tuple[int, ...] = ()) -> int:
    """A port P from QUIET_PORTS with P .. P + size - 1 all free on 127.0.0.1, and at least `size` away from each
    port in `avoid` (for a service that takes several consecutive ports, as behind HAProxy: pipelines/ingress.py)."""
    for _ in range(200):
        first = free_port()
        if first + size > QUIET_PORTS.stop or any(abs(first - other) < size for other in avoid):
            continue
        if all(_nothing_listens(port) for port in range(first, first + size)):
            return first
    raise RuntimeError(f"no {size} consecutive free ports in {QUIET_PORTS.start}-{QUIET_PORTS.stop - 1}")


def _nothing_listens(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0
