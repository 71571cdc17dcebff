"""What one request may ask of a replica. Everything above a limit is a 413 naming the limit, never a slow death."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from serving.codec import MAX_BODY_BYTES, MAX_SIDE


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = MAX_BODY_BYTES
    max_side: int = MAX_SIDE  # pixels per image side, REST and v2
    max_batch: int = 32  # images in one v2 request
    max_frames: int = 64  # frames in one propagation clip
    max_sessions: int = 16  # open propagation sessions per replica

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"limit {name} must be a positive integer, got {value!r}")

    @property
    def max_tensor_elements(self) -> int:
        return self.max_batch * 3 * self.max_side * self.max_side

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
