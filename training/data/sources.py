"""Where a job's images come from, as a config section, and how a worker loads its share of them.

Workers load their own shard from the spec (simulate it, or read it from a path / s3:// prefix) instead of receiving
arrays from the driver, so the same config runs on a laptop and on a cluster.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from training.config import StrictModel
from training.data.folders import folder_index, load_frames, vocalfolds_index
from training.data.simulator import simulate_frames


class DataSpec(StrictModel):
    kind: Literal["sim", "folder", "vocalfolds"] = "sim"
    uri: str | None = Field(None, description="folder or vocalfolds root: a local path or s3:// prefix")
    style: Literal["sim", "real-like"] = Field("sim", description="renderer for kind=sim")
    count: int = Field(400, ge=1, description="number of simulated frames (kind=sim)")
    seed: int = 0
    size: int = Field(256, ge=32, description="frames are resized to size×size")
    patients: list[str] | None = None
    sequences: list[str] | None = Field(None, description="vocalfolds sequences to use, e.g. [seq1, seq2]")
    labelled: bool = Field(True, description="false: labels are never read (unlabelled target images)")

    @model_validator(mode="after")
    def _needs_uri(self) -> DataSpec:
        if self.kind != "sim" and not self.uri:
            raise ValueError(f"data kind {self.kind!r} needs 'uri' (a directory or s3:// prefix)")
        if self.uri and "://" not in self.uri:
            # Ray Train workers run in their own working directory: hand them an absolute path.
            self.uri = os.path.abspath(os.path.expanduser(self.uri))
        return self

    def describe(self) -> str:
        if self.kind == "sim":
            return f"sim[{self.style}, n={self.count}, seed={self.seed}]"
        selected = f" {','.join(self.sequences)}" if self.sequences else ""
        return f"{self.kind}:{self.uri}{selected}"


def shard_bounds(total: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous, near-equal slice [start, stop) of `total` items for worker `rank` of `world`."""
    per, extra = divmod(total, world)
    start = rank * per + min(rank, extra)
    return start, start + per + (1 if rank < extra else 0)


def load_data(spec: DataSpec, rank: int = 0, world: int = 1) -> tuple[np.ndarray, np.ndarray | None]:
    """(images (N,H,W,3) uint8, masks (N,H,W) uint8 or None) for this worker's shard; a folder's keep/ masks
    make ignored pixels IGNORE_INDEX (training/data/folders.py)."""
    if spec.kind == "sim":
        start, stop = shard_bounds(spec.count, rank, world)
        images, masks = simulate_frames(stop - start, seed=spec.seed, style=spec.style, size=spec.size, start=start)
        return images, masks if spec.labelled else None
    if spec.kind == "vocalfolds":
        index = vocalfolds_index(spec.uri, patients=spec.patients, sequences=spec.sequences, labelled=spec.labelled)
    else:
        index = folder_index(spec.uri)
    if not spec.labelled:  # never decode labels (or keep masks) that nobody reads
        index = replace(index, masks=None, keep=None)
    start, stop = shard_bounds(len(index), rank, world)
    return load_frames(index.subset(range(start, stop)), size=spec.size)
