"""Propagation training as a Ray Train job: stage 1 on static images turned into pseudo-sequences, stage 2 on
sequences (simulator and labelled real ones) mixed with pseudo-sequences; after each epoch, batch-norm statistics
averaged over fresh batches, then a checkpoint; resume by name.

The loss is losses.clip_loss over every predicted frame. `run(config)` is the driver side;
`train_loop_per_worker` runs on each Ray Train worker.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from ray.train.torch import prepare_model
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from training import loop
from training.data.normalize import normalize
from training.models.propagation.network import PropagationNet
from training.propagate.config import PropagateJobConfig
from training.propagate.inference import TorchBackend
from training.propagate.losses import clip_loss, first_masks
from training.propagate.models import load_model
from training.propagate.scoring import validation_scores
from training.propagate.sequences import ClipPools, build_pools, labelled_sequences, sample_clips


def draw_clips(
    pools: ClipPools, cfg: PropagateJobConfig, static_share: float, rng: np.random.Generator, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of normalised clips (B, K, 3, H, W) and their label maps (B, K, H, W) on `device`."""
    frames, labels = sample_clips(pools, cfg.compute.batch_size, cfg.data, cfg.deform, static_share, rng)
    b, k = frames.shape[:2]
    frames = normalize(frames.flatten(0, 1)).reshape(b, k, *frames.shape[2:])
    return frames.to(device), labels.to(device)


def forward_clips(
    model: PropagationNet,
    pools: ClipPools,
    cfg: PropagateJobConfig,
    static_share: float,
    rng: np.random.Generator,
    context: loop.WorkerContext,
) -> None:
    """One forward pass over a fresh batch, for the batch-norm statistics."""
    frames, labels = draw_clips(pools, cfg, static_share, rng, context.device)
    with context.autocast():
        model(frames, first_masks(labels, cfg.data.max_objects))


def train_loop_per_worker(config_dict: dict) -> None:
    cfg = PropagateJobConfig.model_validate(config_dict["job"])
    tracking_uri = config_dict["tracking_uri"]
    context = loop.setup_worker(cfg.compute)
    pools = build_pools(cfg.data, context.rank, context.world)
    val = labelled_sequences(cfg.val, dense=True) if (cfg.val and context.is_chief) else None
    if context.is_chief:
        print(
            f"[{cfg.name}] {pools.static_count} static images, {pools.sequence_count} sequences per worker",
            flush=True,
        )

    model = PropagationNet(cfg.model)
    optimizer, scheduler, scaler = loop.make_optimizer(model, cfg.compute, context)
    start_epoch = 0
    state = loop.load_state()
    if state is not None:
        model.load_state_dict(state.get("trained_model", state["model"]))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = state["epoch"] + 1
        if context.is_chief:
            print(f"[{cfg.name}] resuming after epoch {state['epoch'] + 1}", flush=True)
    model = model.to(context.device)
    averaged = weight_average(model, cfg, state)
    average_from = cfg.weight_average_from_epoch or 1  # the moving average starts with the first step
    model = prepare_model(model) if context.world > 1 or context.device.type == "cuda" else model

    for epoch in range(start_epoch, cfg.compute.epochs):
        started = time.perf_counter()
        stage = 1 if epoch < cfg.stage1_epochs else 2
        rng = np.random.default_rng([cfg.compute.seed, context.rank, epoch])  # resumable: same clips per epoch
        share = 1.0 if stage == 1 else cfg.data.static_share
        model.train()
        total_loss = 0.0
        for step in range(cfg.steps_per_epoch):
            frames, labels = draw_clips(pools, cfg, share, rng, context.device)
            with context.autocast():
                logits = model(frames, first_masks(labels, cfg.data.max_objects))
                loss = clip_loss(logits.float(), labels[:, 1:])
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if averaged is not None and epoch + 1 >= average_from:
                averaged.update_parameters(loop.unwrap(model))
            total_loss += loss.item()
            if context.is_chief and (step + 1) % 50 == 0:
                print(
                    f"[{cfg.name}] epoch {epoch + 1} step {step + 1}/{cfg.steps_per_epoch} loss {loss.item():.4f}",
                    flush=True,
                )
        scheduler.step()
        trained = loop.unwrap(model)
        averaging = averaged is not None and int(averaged.n_averaged) > 0
        evaluated = averaged.module if averaging else trained
        # Each worker averages over its own clips, with their own generator so that resumed runs draw the same ones.
        # With a weight average, the trained weights get their statistics too, so both are scored alike.
        for network in (evaluated, trained) if averaging else (evaluated,):
            bn_rng = np.random.default_rng([cfg.compute.seed, context.rank, epoch, 1])
            forward = partial(forward_clips, network, pools, cfg, share, bn_rng, context)
            loop.recalibrate_batch_norm(network, forward, min(cfg.bn_recalibration_batches, cfg.steps_per_epoch))

        metrics = {
            "epoch": epoch + 1,
            "stage": stage,
            "resumed_after_epoch": start_epoch,
            "train_loss": total_loss / cfg.steps_per_epoch,
            "epoch_seconds": time.perf_counter() - started,
        }
        if val is not None:
            scores = validation_scores(TorchBackend(evaluated.cpu(), cfg.memory.top_k), val, cfg.memory)
            evaluated.to(context.device)
            metrics |= {"val_jf": scores["J&F"], "val_j": scores["J"], "val_f": scores["F"]}
            if averaging:  # the same epoch without the average: what the average changed
                trained_backend = TorchBackend(trained.cpu(), cfg.memory.top_k)
                metrics["val_jf_trained"] = validation_scores(trained_backend, val, cfg.memory)["J&F"]
                trained.to(context.device)
        saved = loop.optimiser_state(model, optimizer, scheduler)
        if averaging:  # "model" is what load_model, export and evaluation use
            saved |= {
                "model": evaluated.state_dict(),
                "trained_model": saved["model"],
                "averaged_steps": int(averaged.n_averaged),
            }
        loop.end_epoch(cfg, tracking_uri, metrics, saved, context, epoch)


def weight_average(model: PropagationNet, cfg: PropagateJobConfig, state: dict | None) -> AveragedModel | None:
    """An average of the weights, updated after every step: the exponential moving average at
    `weight_average_decay`, or the uniform one from `weight_average_from_epoch` on (SWA, Izmailov et al. 2018);
    restored, with its step count, from a checkpoint that has one. Late epochs of one run scored the held-out
    sequence 0.47-0.68 apart from epoch to epoch; an average is one model instead of whichever the last step left.
    On the 10-epoch bench the moving average at decay 0.998 moved vocalfolds J&F by at most 0.014 either way
    (mean -0.003), so neither is on by default."""
    if cfg.weight_average_decay is not None:
        averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.weight_average_decay))
    elif cfg.weight_average_from_epoch is not None:
        averaged = AveragedModel(model)  # the default update is the running uniform mean
    else:
        return None
    if state is not None and "trained_model" in state:
        averaged.module.load_state_dict(state["model"])
        # the uniform mean needs the true count; older checkpoints only ever had a moving average
        averaged.n_averaged.fill_(state.get("averaged_steps", 1))
    return averaged


@dataclass
class TrainedPropagator:
    model: PropagationNet
    checkpoint_path: str
    metrics: dict
    last_weights: PropagationNet | None = None  # the trained weights when `model` is their average


def run(cfg: PropagateJobConfig, tracking_uri: str) -> TrainedPropagator:
    """Run the job on the connected Ray cluster; returns the model of the last checkpoint."""
    state, result = loop.fit_job(
        train_loop_per_worker, {"job": cfg.model_dump(mode="json"), "tracking_uri": tracking_uri}, cfg
    )
    last_weights = load_model(state, "trained_model") if "trained_model" in state else None
    return TrainedPropagator(load_model(state), result.checkpoint.path, dict(result.metrics or {}), last_weights)
