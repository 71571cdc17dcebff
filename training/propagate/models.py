"""Propagation models as files and as backends: saving a trained network, loading a checkpoint or the three ONNX
graphs as something `inference.propagate` can run (one model or an ensemble), optionally tuned on each key frame.

Finding what a --model names (a path, a folder of graphs, a models:/ registry ref) is `locate_model`, which uses
serving's graph lookup (`load_graphs`); the loaders take the model already located.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from serving.propagation_graphs import graph_metadata
from training.models.propagation.network import PropagationNet
from training.propagate.config import PropagateJobConfig
from training.propagate.export import ExportedGraphs, OnnxBackend, load_graphs
from training.propagate.inference import MemoryPolicy, TorchBackend
from training.propagate.key_frame_tuning import KeyFrameTuner, KeyFrameTuning


def load_model(state: dict, key: str = "model") -> PropagationNet:
    """The model of a checkpoint state (or of a saved {'model', 'config'} file); `key` "trained_model" picks a
    weight-averaged run's last trained weights."""
    cfg = PropagateJobConfig.model_validate(state["config"])
    model = PropagationNet(cfg.model, pretrained=False)  # the checkpoint holds every weight
    model.load_state_dict(state[key])
    return model.eval()


def save_model(model: torch.nn.Module, cfg: PropagateJobConfig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "config": cfg.model_dump(mode="json")}, path)
    return path


def last_weights_path(model_path: Path) -> Path:
    """Where a weight-averaged run's last trained weights are saved, beside the averaged model."""
    return model_path.with_name(f"{model_path.stem}.last-weights.pt")


def locate_model(model: str | Path, tracking_uri: str | None = None) -> Path | ExportedGraphs:
    """What a --model names: a torch checkpoint (.pt: training state or save_model's file), or the three ONNX
    graphs, on disk (one of them, or their directory) or registered (models:/NAME@ALIAS, `load_graphs`)."""
    if str(model).startswith("models:/"):
        return load_graphs(str(model), tracking_uri)
    path = Path(model).expanduser()
    if path.suffix != ".pt":
        return load_graphs(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; expected a propagation checkpoint")
    return path


def load_backend(located: Path | ExportedGraphs, policy: MemoryPolicy, threads: int | None = None):
    """The backend of a located model: a torch checkpoint (.pt: training state or save_model's file) or the three
    ONNX graphs. Torch backends use the policy's top_k; ONNX graphs have theirs baked in."""
    if isinstance(located, ExportedGraphs):
        return OnnxBackend(located, threads=threads)
    state = torch.load(located, map_location="cpu", weights_only=False)
    if threads:
        torch.set_num_threads(threads)
    return TorchBackend(load_model(state), policy.top_k)


def load_backends(
    located: dict[str, Path | ExportedGraphs], policy: MemoryPolicy, size: int | None, threads: int | None
) -> tuple[object, int]:
    """The backend of one --model, or the list of several (an ensemble, see inference.propagate), and the frame
    side to run at: `size`, else the models' training size, which must then agree. `located`: each model as the
    user named it → what it names (a checkpoint path or the graphs)."""
    if not located:
        raise ValueError("--model: give at least one propagation model")
    backends = [load_backend(found, policy, threads) for found in located.values()]
    if size is None:
        sizes = {model: trained_size(found) for model, found in located.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"--model: trained at different sizes {sizes}; choose one with --size")
        size = next(iter(sizes.values()))
    return (backends[0] if len(backends) == 1 else backends), size


def with_key_frame_tuning(backend, tuning: KeyFrameTuning | None, report=None):
    """The backend (or ensemble) with every member tuned on each key frame it streams from (key_frame_tuning), or
    unchanged when `tuning` is None. Tuning needs gradients: only torch checkpoints can be tuned."""
    if tuning is None:
        return backend
    members = list(backend) if isinstance(backend, list | tuple) else [backend]
    if not all(isinstance(member, TorchBackend) for member in members):
        raise ValueError(
            "--tune-steps: key-frame tuning trains the network, so --model must be torch checkpoints (.pt); "
            "ONNX graphs and models:/ refs cannot be tuned"
        )
    tuners = [KeyFrameTuner(member.model, tuning, member.top_k, report) for member in members]
    return tuners[0] if len(tuners) == 1 else tuners


def trained_size(located: Path | ExportedGraphs) -> int:
    """The frame side the model was trained at (a checkpoint's data.size, or the graphs' endoflow.input_size)."""
    if isinstance(located, ExportedGraphs):
        return int(json.loads(graph_metadata(located["segment"])["endoflow.input_size"])[0])
    return int(torch.load(located, map_location="cpu", weights_only=False)["config"]["data"]["size"])
