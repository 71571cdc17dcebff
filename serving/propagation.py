"""Mask propagation with the three exported graphs (encode_key, encode_value, segment), onnxruntime only.

The contract is the module docstring of training/propagate/export.py (read, never imported: no torch here).
Shapes: frames_hw3 are the client's uint8 RGB frames at any size; they are resized to the graphs' training
`input_size` (H, W), and label maps come back at the client's size. Keys (1, Dk, h, w), values (N, Dv, h, w),
probs (1, N + 1, H, W), with h, w = H/16, W/16 and N the objects of the first mask.
A Stream holds one video's memory; it is not thread-safe (the caller serialises steps of one stream).

Version: the three graphs only work together (keys and values in a stream's memory come from the encoders of the
same training as the segment graph reading them), so they are one version: the sha256 over the three graphs'
sha256s, `version` its first 12 hex digits. The same graphs are also offered as three raw v2 models
(`<name>-encode_key`, `-encode_value`, `-segment`, the names `endoflow propagate train --register NAME` gives
them), all carrying that one version, for clients that keep the memory themselves.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from serving.errors import RequestError
from serving.memory_stream import MemoryStream, one_hot, winning_channels
from serving.onnx_model import Provider, make_session
from serving.pixels import PixelNormalizer
from serving.propagation_graphs import GRAPHS, check_one_export
from serving.raw_model import RawOnnxModel
from serving.resolve import ResolvedModel


@dataclass(frozen=True)
class PropagationMetadata:
    class_names: tuple[str, ...]
    input_size: tuple[int, int]
    mean: np.ndarray  # float32 (3,)
    std: np.ndarray
    mem_every: int
    max_memory: int
    previous_frame: bool  # graphs exported before the flag existed read without it
    min_area: float  # 0 for graphs exported before the option existed

    @classmethod
    def from_props(cls, props: dict[str, str], source: Path) -> PropagationMetadata:
        try:
            if props["endoflow.task"] != "propagation":
                raise ValueError(f"endoflow.task is {props['endoflow.task']!r}, expected 'propagation'")
            size = json.loads(props["endoflow.input_size"])
            norm = json.loads(props["endoflow.normalization"])
            memory = json.loads(props["endoflow.memory"])
            stride = int(props["endoflow.key_stride"])
            if len(size) != 2 or size[0] % stride or size[1] % stride:
                raise ValueError(f"input_size {size} is not [H, W] in multiples of the key stride {stride}")
            min_area = float(memory.get("min_area", 0.0))
            if not 0 <= min_area < 1:
                raise ValueError(f"endoflow.memory min_area {min_area}: expected a fraction of the frame in [0, 1)")
            return cls(
                class_names=tuple(json.loads(props["endoflow.class_names"])),
                input_size=(int(size[0]), int(size[1])),
                mean=np.array(norm["mean"], np.float32),
                std=np.array(norm["std"], np.float32),
                mem_every=int(memory["mem_every"]),
                max_memory=int(memory["max_memory"]),
                previous_frame=bool(memory.get("previous_frame", False)),
                min_area=min_area,
            )
        except KeyError as err:
            raise ValueError(f"{source}: propagation metadata key {err} is missing") from err
        except (ValueError, TypeError) as err:
            raise ValueError(f"{source}: invalid propagation metadata: {err}") from err


class OnnxPropagator:
    def __init__(
        self,
        graphs: dict[str, ResolvedModel],
        providers: Sequence[Provider] = ("CPUExecutionProvider",),
        threads: int | None = None,
    ) -> None:
        self.graphs = graphs
        self.sessions = {g: make_session(graphs[g].path, providers, threads) for g in GRAPHS}
        props = {g: dict(self.sessions[g].get_modelmeta().custom_metadata_map) for g in GRAPHS}
        check_one_export(props, graphs)  # again on what the sessions loaded: files may move
        self.metadata = PropagationMetadata.from_props(props["segment"], graphs["segment"].path)
        self.normalize = PixelNormalizer(self.metadata.mean, self.metadata.std)
        self.providers = self.sessions["segment"].get_providers()
        self.sha256 = {g: graphs[g].sha256 for g in GRAPHS}
        self.bundle_sha256 = hashlib.sha256("".join(f"{g}:{self.sha256[g]}\n" for g in GRAPHS).encode()).hexdigest()
        self.version = self.bundle_sha256[:12]
        # Registered graphs are named NAME-<graph>; local files <stem>.<graph>.onnx: either way the base name.
        self.name = graphs["segment"].name.removesuffix("-segment").removesuffix(".segment")
        self.v2_models = {
            f"{self.name}-{g}": RawOnnxModel(
                f"{self.name}-{g}",
                self.version,
                self.sessions[g],
                {"propagation_model": self.name, "graph": g, "sha256": self.sha256[g], "ref": graphs[g].ref},
                pixels=self.normalize,
            )
            for g in GRAPHS
        }

    @property
    def identity(self) -> dict[str, object]:
        return {"name": self.name, "sha256": self.bundle_sha256, "version": self.version, "graphs": self.sha256}

    def prepare(self, frame_hw3: np.ndarray) -> np.ndarray:
        """uint8 (h, w, 3) at any size -> normalised float32 (1, 3, H, W) at input_size."""
        height, width = self.metadata.input_size
        if frame_hw3.shape[:2] != (height, width):
            frame_hw3 = np.asarray(Image.fromarray(frame_hw3).resize((width, height), Image.Resampling.BILINEAR))
        return self.normalize(frame_hw3[None])

    def encode_key(self, image: np.ndarray) -> list[np.ndarray]:
        return self.sessions["encode_key"].run(None, {"image": image})

    def encode_value(self, image: np.ndarray, f16: np.ndarray, masks_n1hw: np.ndarray) -> np.ndarray:
        return self.sessions["encode_value"].run(None, {"image": image, "f16": f16, "masks": masks_n1hw})[0]

    def segment(self, key, f16, f8, f4, memory_keys, memory_values) -> np.ndarray:
        feeds = {"key": key, "f16": f16, "f8": f8, "f4": f4, "memory_keys": memory_keys}
        return self.sessions["segment"].run(None, feeds | {"memory_values": memory_values})[0]


class Stream(MemoryStream):
    """One video: opened with its first frame and mask, then one `step` per later frame (the contract's loop, in
    MemoryStream), at the client's frame size and with the client's labels."""

    def __init__(self, model: OnnxPropagator, frame_hw3: np.ndarray, mask_hw: np.ndarray) -> None:
        if frame_hw3.shape[:2] != mask_hw.shape:
            raise RequestError(
                400,
                f"mask is {mask_hw.shape[1]}x{mask_hw.shape[0]} but the frame is "
                f"{frame_hw3.shape[1]}x{frame_hw3.shape[0]}; they must match",
            )
        if int(mask_hw.max(initial=0)) >= len(model.metadata.class_names):
            raise RequestError(
                400,
                f"mask has label {int(mask_hw.max())}; the model knows "
                f"{len(model.metadata.class_names)} classes (0..{len(model.metadata.class_names) - 1})",
            )
        self.model = model
        self.objects = [int(o) for o in np.unique(mask_hw) if o != 0]
        self.lookup = np.array([0, *self.objects], np.uint8)
        self.frames_seen = 1
        super().__init__(model, model.metadata)
        if self.objects:
            height, width = model.metadata.input_size
            small = np.asarray(Image.fromarray(mask_hw).resize((width, height), Image.Resampling.NEAREST))
            self.start(model.prepare(frame_hw3), one_hot(small, self.objects))

    def step(self, frame_hw3: np.ndarray) -> np.ndarray:
        """uint8 (h, w, 3) -> uint8 label map (h, w)."""
        t, self.frames_seen = self.frames_seen, self.frames_seen + 1
        if not self.objects:  # nothing to follow: every later frame is background
            return np.zeros(frame_hw3.shape[:2], np.uint8)
        probs = self.read(self.model.prepare(frame_hw3))
        labels = self.lookup[winning_channels(probs[0], self.model.metadata.min_area)]
        self.remember(t, probs)
        height, width = frame_hw3.shape[:2]
        if labels.shape == (height, width):
            return labels
        return np.asarray(Image.fromarray(labels).resize((width, height), Image.Resampling.NEAREST))
