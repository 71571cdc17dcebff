"""ONNX export of the propagation network: three graphs that serving runs as a stream, without torch.

THE CONTRACT (read by serving/; stable — change this docstring first if it ever has to change)

Files: one directory, three self-contained graphs named `<stem>.encode_key.onnx`, `<stem>.encode_value.onnx`,
`<stem>.segment.onnx`; the registry holds them as three models `<NAME>-encode_key`, `<NAME>-encode_value`,
`<NAME>-segment` with the same alias. Every tensor is float32. H, W: multiples of `endoflow.size_multiple` (16);
h = H/16, w = W/16 (`endoflow.key_stride` = 16); N ≥ 1 objects; T ≥ 1 memory frames. Dk, Dv, C16, C8, C4 are
in `endoflow.dims`. Batch axis of the query is always 1. Raw uint8 RGB is not a graph input (one dtype per input):
the server normalises uint8 frames exactly as below (serving/pixels.py), and its v2 models of encode_key and
encode_value say in their metadata that `image` also takes UINT8 (1, H, W, 3).

  encode_key    in   image          (1, 3, H, W)      RGB, (pixel/255 − mean)/std  (`endoflow.normalization`)
                out  key            (1, Dk, h, w)
                     f16            (1, C16, h, w)    query features, for segment and encode_value
                     f8             (1, C8, H/8, W/8) query skip features, for segment
                     f4             (1, C4, H/4, W/4) query skip features, for segment
  encode_value  in   image          (1, 3, H, W)      as above
                     f16            (1, C16, h, w)    encode_key's f16 of the same image
                     masks          (N, 1, H, W)      per-object probability in [0, 1] (one-hot of a label map, or
                                                      segment's probs[0, 1:, None])
                out  value          (N, Dv, h, w)
  segment       in   key, f16, f8, f4                 encode_key's outputs for the query frame
                     memory_keys    (T, Dk, h, w)     keys of the memory frames (any frame order...)
                     memory_values  (N, T, Dv, h, w)  ...their values, in the same frame order
                out  probs          (1, N + 1, H, W)  softmax over background (channel 0) and the N objects

Metadata (`metadata_props`, all strings; JSON where structured), identical in the three files except `graph`:
  endoflow.task "propagation"; endoflow.graph "encode_key" | "encode_value" | "segment";
  endoflow.graphs {"encode_key": file name, "encode_value": ..., "segment": ...} (siblings in the same directory);
  endoflow.class_names [..] (a label map's values index it); endoflow.background_label "0";
  endoflow.input_size [H, W] (training size); endoflow.normalization {"mean": [3], "std": [3]};
  endoflow.size_multiple "16"; endoflow.key_stride "16";
  endoflow.dims {"key": Dk, "value": Dv, "f16": C16, "f8": C8, "f4": C4};
  endoflow.memory {"mem_every": 2, "max_memory": 16, "previous_frame": true, "top_k": 20, "min_area": 0.005}
    (defaults; top_k is baked into segment, null = all; graphs without previous_frame or min_area predate them and
    mean false and 0);
  endoflow.source_run_id; endoflow.model_config (the torch config, for provenance).

How a client runs a stream (training/propagate/inference.py does exactly this in torch):
  objects = sorted labels present in the given mask, without the background label 0; object i ↔ objects[i].
  key frame: key, f16, f8, f4 = encode_key(image); value = encode_value(image, f16, one_hot(mask, objects));
    memory = [(key, value, frame 0)]; its output is the given mask.
  every later frame t: key, f16, f8, f4 = encode_key(image_t);
    probs = segment(key, f16, f8, f4, concat(memory keys, axis 0), concat(memory values, axis 1));
    label_t = 0 where argmax(probs, 1) == 0, else objects[argmax − 1]; an object winning fewer than min_area × H × W
    pixels is absent from frame t: argmax again with its channel out (one pass; background never drops out).
    if t is a multiple of mem_every (counted from the key frame): append (key, encode_value(image_t, f16_t,
    probs[0, 1:, None])); if the memory then holds more than max_memory frames, drop the oldest frame that is
    not the key frame (the key frame is always kept).
    otherwise, if previous_frame: frame t's (key, value) is read by frame t + 1 only, appended after the memory
    (so segment sees at most max_memory + 1 frames), and not kept.
  bidirectional from a middle key frame: two independent streams, forward and backward in time.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn
from torch.export import Dim

from serving.propagation_graphs import GRAPHS, resolve_graphs
from training.data.classes import CLASS_NAMES
from training.data.normalize import IMAGENET_MEAN, IMAGENET_STD
from training.export import _quiet_exporter
from training.models.encoders import encoder_provenance
from training.models.propagation.network import KEY_STRIDE, PropagationNet
from training.propagate.inference import MemoryPolicy


class EncodeKeyGraph(nn.Module):
    def __init__(self, model: PropagationNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.model.encode_key(image)


class EncodeValueGraph(nn.Module):
    def __init__(self, model: PropagationNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor, f16: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return self.model.encode_value(image, f16, masks[:, 0].unsqueeze(0))[0]


class SegmentGraph(nn.Module):
    def __init__(self, model: PropagationNet, top_k: int | None) -> None:
        super().__init__()
        self.model, self.top_k = model, top_k

    def forward(self, key, f16, f8, f4, memory_keys, memory_values) -> torch.Tensor:
        n, t, dv, h, w = memory_values.shape
        keys = memory_keys.permute(1, 0, 2, 3).reshape(1, memory_keys.shape[1], t * h * w)
        values = memory_values.permute(0, 2, 1, 3, 4).reshape(1, n, dv, t * h * w)
        return self.model.segment_probs(key, f16, f8, f4, keys, values, self.top_k)


@dataclass
class ExportedGraphs:
    paths: dict[str, Path]  # graph name → file

    def __getitem__(self, graph: str) -> Path:
        return self.paths[graph]


def propagation_metadata(
    model: PropagationNet, graph: str, files: dict[str, str], input_size: int, policy: MemoryPolicy, run_id: str | None
) -> dict[str, str]:
    cfg = model.cfg
    return {
        "endoflow.task": "propagation",
        "endoflow.graph": graph,
        "endoflow.graphs": json.dumps(files),
        "endoflow.class_names": json.dumps(list(CLASS_NAMES)),
        "endoflow.background_label": "0",
        "endoflow.input_size": json.dumps([input_size, input_size]),
        "endoflow.normalization": json.dumps({"mean": IMAGENET_MEAN, "std": IMAGENET_STD}),
        "endoflow.size_multiple": str(cfg.size_multiple),
        "endoflow.key_stride": str(KEY_STRIDE),
        "endoflow.dims": json.dumps(
            {"key": cfg.key_dim, "value": cfg.value_dim, "f16": cfg.c16, "f8": cfg.c8, "f4": cfg.c4}
        ),
        # flip_average is an offline option of training/propagate/inference.py, not part of the streaming contract.
        "endoflow.memory": policy.model_dump_json(exclude={"flip_average"}),
        "endoflow.source_run_id": run_id or "",
        "endoflow.model_config": cfg.model_dump_json(),
        "endoflow.encoder": json.dumps(encoder_provenance(cfg.key_encoder)),
    }


def export_propagation(
    model: PropagationNet,
    out_dir: Path,
    stem: str = "propagation",
    input_size: int = 256,
    policy: MemoryPolicy | None = None,
    run_id: str | None = None,
) -> ExportedGraphs:
    """Write the three graphs of the contract (module docstring) under `out_dir`; returns their paths."""
    policy = policy or MemoryPolicy()
    model = model.eval().cpu()
    if input_size % KEY_STRIDE:
        raise ValueError(f"input_size {input_size} must be a multiple of {KEY_STRIDE}")
    cfg, s = model.cfg, input_size // KEY_STRIDE
    hb, wb = Dim("h16", min=1, max=256), Dim("w16", min=1, max=256)
    objects, frames = Dim("objects", min=1, max=64), Dim("memory_frames", min=1, max=256)
    image = torch.zeros(1, 3, input_size, input_size)
    with torch.no_grad():
        key, f16, f8, f4 = model.encode_key(image)
    masks = torch.zeros(2, 1, input_size, input_size)
    memory_keys = torch.zeros(3, cfg.key_dim, s, s)
    memory_values = torch.zeros(2, 3, cfg.value_dim, s, s)
    image_dims = {2: KEY_STRIDE * hb, 3: KEY_STRIDE * wb}

    def at(stride: int) -> dict[int, Dim]:
        return {2: (KEY_STRIDE // stride) * hb, 3: (KEY_STRIDE // stride) * wb}

    specs = {
        "encode_key": (EncodeKeyGraph(model), (image,), ["image"], ["key", "f16", "f8", "f4"], {"image": image_dims}),
        "encode_value": (
            EncodeValueGraph(model),
            (image, f16, masks),
            ["image", "f16", "masks"],
            ["value"],
            {"image": image_dims, "f16": at(16), "masks": {0: objects, **image_dims}},
        ),
        "segment": (
            SegmentGraph(model, policy.top_k),
            (key, f16, f8, f4, memory_keys, memory_values),
            ["key", "f16", "f8", "f4", "memory_keys", "memory_values"],
            ["probs"],
            {
                "key": at(16),
                "f16": at(16),
                "f8": at(8),
                "f4": at(4),
                "memory_keys": {0: frames, 2: hb, 3: wb},
                "memory_values": {0: objects, 1: frames, 3: hb, 4: wb},
            },
        ),
    }
    files = {graph: f"{stem}.{graph}.onnx" for graph in GRAPHS}
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for graph, (module, args, inputs, outputs, dynamic) in specs.items():
        path = out_dir / files[graph]
        with warnings.catch_warnings(), _quiet_exporter():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                args,
                str(path),
                input_names=inputs,
                output_names=outputs,
                dynamo=True,
                dynamic_shapes=dynamic,
                external_data=False,
                verbose=False,
            )
        proto = onnx.load(str(path))
        del proto.metadata_props[:]
        for name, value in propagation_metadata(model, graph, files, input_size, policy, run_id).items():
            proto.metadata_props.add(key=name, value=value)
        onnx.checker.check_model(proto)
        onnx.save(proto, str(path))
        paths[graph] = path
    return ExportedGraphs(paths)


class OnnxBackend:
    """The three exported graphs run by onnxruntime behind the same interface as inference.TorchBackend."""

    def __init__(self, graphs: ExportedGraphs | dict[str, Path], threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        # Each session has its own thread pool, and the three run in turn: threads left spinning after one graph
        # take the cores from the next (on 2 cores this halved the stream's frames/s). serving/ does the same.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        paths = graphs.paths if isinstance(graphs, ExportedGraphs) else graphs
        self.sessions = {
            g: ort.InferenceSession(str(paths[g]), options, providers=["CPUExecutionProvider"]) for g in GRAPHS
        }

    def encode_key(self, image: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(self.sessions["encode_key"].run(None, {"image": image}))

    def encode_value(self, image: np.ndarray, f16: np.ndarray, masks_n1hw: np.ndarray) -> np.ndarray:
        return self.sessions["encode_value"].run(None, {"image": image, "f16": f16, "masks": masks_n1hw})[0]

    def segment(self, key, f16, f8, f4, memory_keys, memory_values) -> np.ndarray:
        feeds = {"key": key, "f16": f16, "f8": f8, "f4": f4, "memory_keys": memory_keys}
        return self.sessions["segment"].run(None, feeds | {"memory_values": memory_values})[0]


def load_graphs(reference: str | Path, tracking_uri: str | None = None) -> ExportedGraphs:
    """The three graphs of one export that `reference` names — one of them, their directory, or models:/NAME@ALIAS
    (NAME/VERSION) — found and checked by serving's torch-free `resolve_graphs`, the one rule for both sides."""
    return ExportedGraphs({g: r.path for g, r in resolve_graphs(str(reference), tracking_uri=tracking_uri).items()})
