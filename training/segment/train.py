"""Segmentation training as a Ray Train job: source frames (optionally FDA-translated toward unlabelled target
frames) → cross-entropy, validation on labelled target frames every epoch, a checkpoint every epoch. Pixels
labelled IGNORE_INDEX (a pseudo-label set's keep/ masks) count in neither the loss nor the scores.

`run(config)` is the driver side; `train_loop_per_worker` runs on each Ray Train worker.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from ray.train.torch import prepare_model

from training import loop
from training.data.normalize import normalize, to_unit_bchw
from training.data.sources import load_data
from training.losses import masked_cross_entropy
from training.metrics import validation_metrics
from training.models.unet import Segmenter
from training.segment.config import AugmentConfig, SegmentJobConfig, StyleConfig
from training.segment.predict import score
from training.style.transforms import apply_style


def augment(batch_unit: torch.Tensor, masks: torch.Tensor, cfg: AugmentConfig, rng: torch.Generator):
    """Flips move images and label maps alike; photometric jitter touches the images only, so label values
    (IGNORE_INDEX included) pass through unchanged."""
    if cfg.hflip:
        flip = torch.rand(batch_unit.shape[0], generator=rng) < 0.5
        batch_unit[flip] = batch_unit[flip].flip(-1)
        masks[flip] = masks[flip].flip(-1)
    n = batch_unit.shape[0]
    if cfg.brightness > 0:
        batch_unit *= 1 + (torch.rand(n, 1, 1, 1, generator=rng) * 2 - 1) * cfg.brightness
    if cfg.contrast > 0:
        mean = batch_unit.mean(dim=(1, 2, 3), keepdim=True)
        batch_unit = (batch_unit - mean) * (1 + (torch.rand(n, 1, 1, 1, generator=rng) * 2 - 1) * cfg.contrast) + mean
    return batch_unit.clamp_(0, 1), masks


def stylise(batch_unit: torch.Tensor, target_images: np.ndarray | None, cfg: StyleConfig, rng: torch.Generator):
    if cfg.method == "none" or target_images is None:
        return batch_unit
    picks = torch.randint(len(target_images), (batch_unit.shape[0],), generator=rng)
    translated = apply_style(cfg.method, batch_unit, to_unit_bchw(target_images[picks.numpy()]), cfg.beta)
    keep = torch.rand(batch_unit.shape[0], generator=rng) >= cfg.probability
    translated[keep] = batch_unit[keep]
    return translated


def train_loop_per_worker(config_dict: dict) -> None:
    cfg = SegmentJobConfig.model_validate(config_dict["job"])
    tracking_uri = config_dict["tracking_uri"]
    context = loop.setup_worker(cfg.compute)
    images, masks = load_data(cfg.source, context.rank, context.world)
    if masks is None:
        raise ValueError(f"source data {cfg.source.describe()} has no labels; the segmentation job needs them")
    target_images = load_data(cfg.target, context.rank, context.world)[0] if cfg.target else None
    val_images, val_masks = load_data(cfg.val) if (cfg.val and context.is_chief) else (None, None)

    model = Segmenter(cfg.model)
    optimizer, scheduler, scaler = loop.make_optimizer(
        model, cfg.compute, context, model.parameter_groups(cfg.compute.lr)
    )
    start_epoch = 0
    if (state := loop.load_state()) is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = state["epoch"] + 1
        if context.is_chief:
            print(f"[{cfg.name}] resuming after epoch {state['epoch'] + 1}", flush=True)
    model = prepare_model(model) if context.world > 1 or context.device.type == "cuda" else model

    rng = torch.Generator().manual_seed(cfg.compute.seed * 1000 + context.rank)
    steps = max(1, len(images) // cfg.compute.batch_size)
    for epoch in range(start_epoch, cfg.compute.epochs):
        started = time.perf_counter()
        rng.manual_seed(cfg.compute.seed * 1000 + context.rank * 100 + epoch)  # resumable, same batches
        order = torch.randperm(len(images), generator=rng).numpy()
        model.train()
        total_loss = 0.0
        for step in range(steps):
            index = np.sort(order[step * cfg.compute.batch_size : (step + 1) * cfg.compute.batch_size])
            batch = stylise(to_unit_bchw(images[index]), target_images, cfg.style, rng)
            batch, labels = augment(batch, torch.as_tensor(masks[index]).long(), cfg.augment, rng)
            batch, labels = normalize(batch).to(context.device), labels.to(context.device)
            with context.autocast():
                loss = masked_cross_entropy(model(batch), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            total_loss += loss.item()
        scheduler.step()

        metrics = {
            "epoch": epoch + 1,
            "resumed_after_epoch": start_epoch,
            "train_loss": total_loss / steps,
            "epoch_seconds": time.perf_counter() - started,
        }
        if val_images is not None:
            summary, _ = score(loop.unwrap(model), val_images, val_masks)
            metrics |= validation_metrics(summary)
        loop.end_epoch(cfg, tracking_uri, metrics, loop.optimiser_state(model, optimizer, scheduler), context, epoch)


@dataclass
class TrainedSegmenter:
    model: Segmenter
    checkpoint_path: str
    metrics: dict


def run(cfg: SegmentJobConfig, tracking_uri: str) -> TrainedSegmenter:
    """Run the job on the connected Ray cluster; returns the model of the last checkpoint."""
    state, result = loop.fit_job(
        train_loop_per_worker, {"job": cfg.model_dump(mode="json"), "tracking_uri": tracking_uri}, cfg
    )
    model = Segmenter(cfg.model, pretrained=False)
    model.load_state_dict(state["model"])
    return TrainedSegmenter(model.eval(), result.checkpoint.path, dict(result.metrics or {}))
