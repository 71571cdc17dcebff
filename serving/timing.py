"""Where a request's time goes, as the W3C `Server-Timing` response header: `read;dur=0.041, parse;dur=0.012, ...`
(milliseconds). Browsers' network panels show it, and `endoflow bench serve` adds it up into the overhead profile
that says which part of the served latency is ours and which is the HTTP path in front of it.

Stages of a v2 segmentation request: read (the body off the socket), parse (the v2 header and tensor views),
prepare (checks and normalisation), queue (waiting for the batch queue), onnx (onnxruntime, the whole batch's call),
respond (argmax and encoding). A raw propagation graph has read, parse, run (the graph and the encoding) and
respond; REST `/v1/segment` and `/v1/overlay` read, decode, queue, onnx and respond.
"""

from __future__ import annotations

import time

HEADER = "Server-Timing"


class Stages:
    def __init__(self) -> None:
        self.durations: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, name: str) -> None:
        """The stage `name` ended now; it began where the previous one ended."""
        now = time.perf_counter()
        self.durations[name] = self.durations.get(name, 0.0) + now - self._last
        self._last = now

    def split(self, name: str, part: str, part_seconds: float) -> None:
        """Carve `part_seconds` of the already marked stage `name` out as its own stage `part`."""
        part_seconds = min(part_seconds, self.durations.get(name, 0.0))
        self.durations[name] -= part_seconds
        self.durations[part] = self.durations.get(part, 0.0) + part_seconds

    def header(self) -> dict[str, str]:
        return {HEADER: ", ".join(f"{name};dur={seconds * 1000:.3f}" for name, seconds in self.durations.items())}


def parse_server_timing(value: str) -> dict[str, float]:
    """A `Server-Timing` header -> {stage: milliseconds}; entries without a duration are left out."""
    stages: dict[str, float] = {}
    for entry in value.split(","):
        name, *params = (part.strip() for part in entry.split(";"))
        for param in params:
            key, _, number = param.partition("=")
            if key == "dur" and name:
                stages[name] = float(number)
    return stages
