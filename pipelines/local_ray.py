"""Start (or join) Ray for one command and leave nothing behind.

Ray 2.60 turns on token auth and, by default, writes the token under $HOME and its session files under the system
temp directory. A local run here gets a fresh in-memory token and a private temp directory that is removed on exit,
so repeated runs and tests never see each other's state. With `address` (or RAY_ADDRESS) set, we only connect.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator

import ray


@contextlib.contextmanager
def local_ray(num_cpus: int | None = None, address: str | None = None) -> Iterator[dict]:
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
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    # Unix socket paths are limited to ~107 bytes, so the session dir stays short and under /tmp.
    temp_dir = tempfile.mkdtemp(prefix="efray-", dir="/tmp")
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
        yield {"temp_dir": temp_dir}
    finally:
        with contextlib.suppress(Exception):
            from ray import serve

            serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
