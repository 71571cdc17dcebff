"""One loaded model and what is derived from it, swapped as a whole so a request never mixes two models."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from serving.onnx_model import OnnxSegmenter
from serving.resolve import ResolvedModel


@dataclass(frozen=True)
class LoadedModel:
    """Everything derived from one model file; swapped as a whole so a request never mixes two models."""

    resolved: ResolvedModel
    model: OnnxSegmenter
    palette: np.ndarray

    @property
    def version(self) -> str:
        return self.resolved.sha256[:12]

    @property
    def identity(self) -> dict[str, str]:
        r = self.resolved
        return {"name": r.name, "ref": r.ref, "sha256": r.sha256, "version": self.version}
