"""What every Ray Train job shares: the compute section of its config, worker set-up, checkpoints, the trainer.

A job module supplies only its `train_loop_per_worker` and its config; this file owns the Ray Train plumbing so
the style, adapt, segment and propagate jobs do not each carry a copy of it.

CUDA path (never needed by the tests): `gpus_per_worker > 0` selects NCCL, puts the model on the worker's GPU via
`ray.train.torch.prepare_model`, and turns on mixed precision (bf16/fp16 autocast + GradScaler) when `amp` is set.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import torch
from pydantic import BaseModel, Field
from pydantic_core import PydanticUndefined
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from training import tracking
from training.config import ConfigError, StrictModel
from training.data import storage

STATE_FILE = "state.pt"


class ComputeConfig(StrictModel):
    epochs: int = Field(6, ge=1)
    batch_size: int = Field(8, ge=1, description="per worker")
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    workers: int = Field(2, ge=1, description="Ray Train workers (data-parallel replicas)")
    cpus_per_worker: int = Field(1, ge=1, description="also the torch thread count of each worker")
    gpus_per_worker: float = Field(0.0, ge=0, description="> 0: CUDA with NCCL")
    amp: bool = Field(True, description="mixed precision; only ever active on CUDA")
    max_failures: int = Field(2, ge=0, description="worker failures survived by restarting from the last checkpoint")
    seed: int = 0


@dataclass
class WorkerContext:
    rank: int
    world: int
    device: torch.device
    use_amp: bool

    @property
    def is_chief(self) -> bool:
        return self.rank == 0

    def autocast(self) -> torch.autocast:
        return torch.autocast(device_type=self.device.type, dtype=torch.float16, enabled=self.use_amp)


def setup_worker(compute: ComputeConfig) -> WorkerContext:
    context = ray.train.get_context()
    torch.set_num_threads(compute.cpus_per_worker)
    seed = compute.seed + context.get_world_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    device = ray.train.torch.get_device() if compute.gpus_per_worker > 0 else torch.device("cpu")
    return WorkerContext(
        rank=context.get_world_rank(),
        world=context.get_world_size(),
        device=device,
        use_amp=compute.amp and device.type == "cuda",
    )


def make_optimizer(
    model: torch.nn.Module, compute: ComputeConfig, context: WorkerContext, groups: list[dict] | None = None
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler, torch.amp.GradScaler]:
    """AdamW with a per-epoch cosine schedule, and the AMP grad scaler (a no-op off CUDA): the same for every job.
    `groups`: parameter groups with their own lr (a pretrained encoder's smaller one); default all of the model's."""
    params = groups if groups is not None else model.parameters()
    optimizer = torch.optim.AdamW(params, lr=compute.lr, weight_decay=compute.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=compute.epochs)
    return optimizer, scheduler, torch.amp.GradScaler(enabled=context.use_amp)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def recalibrate_batch_norm(model: torch.nn.Module, run_batch: Callable[[], object], batches: int) -> None:
    """Replace every batch norm's running statistics by their plain average over `batches` forward passes
    (`run_batch`, train mode, no gradients), as in "precise BN" (Wu & Johnson, 2021). The momentum estimate mostly
    reflects the last ~10 small, mixed batches, so the evaluated model, and its score, jumped from epoch to epoch."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms or batches <= 0:
        return
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # None: a cumulative average over the passes
    was_training = model.training
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            run_batch()
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
    model.train(was_training)


def load_state() -> dict[str, Any] | None:
    """The state saved with the latest reported checkpoint of this run (after a restart or a resume), if any."""
    checkpoint = ray.train.get_checkpoint()
    return None if checkpoint is None else read_checkpoint_state(checkpoint)


def report(metrics: dict[str, float], state: dict[str, Any], context: WorkerContext) -> None:
    """Report an epoch's metrics from every worker; only the chief writes the checkpoint (identical DDP replicas)."""
    if not context.is_chief:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        torch.save(state, Path(directory) / STATE_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def optimiser_state(model: torch.nn.Module, optimizer: Any, scheduler: Any) -> dict[str, Any]:
    """The checkpoint entries every single-network job saves (the job adds its own)."""
    return {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
    }


def end_epoch(
    cfg: Any, tracking_uri: str, metrics: dict[str, float], state: dict[str, Any], context: WorkerContext, epoch: int
) -> None:
    """The chief logs the epoch to MLflow and prints it; then every worker reports, the chief with the checkpoint.

    `cfg` is any job config (name, compute.epochs, tracking.run_id); the checkpoint gets the epoch and the config so
    a resume and a later export need nothing else.
    """
    if context.is_chief:
        tracking.log_worker_metrics(tracking_uri, cfg.tracking.run_id, metrics, step=epoch + 1)
        shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k not in ("epoch", "resumed_after_epoch"))
        print(f"[{cfg.name}] epoch {epoch + 1}/{cfg.compute.epochs} {shown}", flush=True)
    report(metrics, state | {"epoch": epoch, "config": cfg.model_dump(mode="json")}, context)


def read_checkpoint_state(checkpoint: ray.train.Checkpoint) -> dict[str, Any]:
    with checkpoint.as_directory() as directory:
        return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=False)


def checkpoint_state_file(path: str) -> Path:
    """The state file behind a checkpoint path given in a config (an adapt teacher, style's segmenter): state.pt
    itself, a checkpoint dir, or a Ray run dir (its latest checkpoint)."""
    found = Path(path).expanduser().resolve()  # absolute: Ray workers do not share the driver's cwd
    if found.is_dir() and not (found / STATE_FILE).is_file():
        # Ray names checkpoint dirs by time, so the latest sorts last.
        checkpoints = sorted(c for c in found.glob("checkpoint_*") if (c / STATE_FILE).is_file())
        found = checkpoints[-1] if checkpoints else found
    if found.is_dir():
        found = found / STATE_FILE
    if not found.is_file():
        raise FileNotFoundError(f"checkpoint {path!r}: no {STATE_FILE} there")
    return found


def fit(
    train_loop_per_worker: Callable[[dict], None],
    loop_config: dict[str, Any],
    compute: ComputeConfig,
    name: str,
    storage_path: str,
) -> ray.train.Result:
    """Run a TorchTrainer. Re-running with the same name and storage path resumes from the last checkpoint."""
    if "://" not in storage_path:
        storage_path = os.path.abspath(storage_path)
    use_gpu = compute.gpus_per_worker > 0
    resources = {"CPU": compute.cpus_per_worker} | ({"GPU": compute.gpus_per_worker} if use_gpu else {})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=compute.workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=compute.max_failures),
        ),
    )
    return trainer.fit()


def saved_model_section(saved: dict | None, model_type: type[BaseModel]) -> dict | None:
    """A checkpoint's `model` section with the fields added to `model_type` since it was written at their defaults:
    the behaviour it was trained with (e.g. UNetConfig.label_set, laryngoscopy before it existed)."""
    if saved is None:
        return None
    fields = model_type.model_fields.items()
    added = {k: f.default for k, f in fields if k not in saved and f.default is not PydanticUndefined}
    return {**added, **saved}


def check_resumable(cfg: Any) -> None:
    """A run of the same name resumes from its last checkpoint: refuse, before any worker starts, one whose `model`
    section differs from this config's, since its weights would not load. Local storage only (an S3 run that does
    not match fails when the workers load it)."""
    if storage.is_s3(cfg.runs_dir) or "model" not in type(cfg).model_fields:
        return
    root = Path(cfg.runs_dir) / "ray" / cfg.name
    saved = sorted(root.glob(f"checkpoint_*/{STATE_FILE}"))  # names carry their time: the last is the newest
    if not saved:
        return
    trained_with = torch.load(saved[-1], map_location="cpu", weights_only=False)["config"].get("model")
    trained_with = saved_model_section(trained_with, type(cfg.model))
    wanted = cfg.model_dump(mode="json")["model"]
    if trained_with != wanted:
        raise ConfigError(
            f"run {cfg.name!r} ({root}) has checkpoints of model {trained_with}, but this config asks for model "
            f"{wanted}; a run of the same name resumes: start over with --fresh (or delete {root}), or choose "
            "another name"
        )


def fit_job(
    train_loop_per_worker: Callable[[dict], None], loop_config: dict[str, Any], cfg: Any
) -> tuple[dict[str, Any], ray.train.Result]:
    """`fit` for a job config (name, runs_dir, compute): checkpoints under <runs_dir>/ray (a path or s3:// prefix).
    Returns the state of the last checkpoint and the result; no checkpoint at all is an error."""
    check_resumable(cfg)
    result = fit(train_loop_per_worker, loop_config, cfg.compute, cfg.name, storage.join(cfg.runs_dir, "ray"))
    if result.checkpoint is None:
        raise RuntimeError(f"training run {cfg.name} produced no checkpoint (error: {result.error})")
    return read_checkpoint_state(result.checkpoint), result
