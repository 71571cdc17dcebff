"""Sim→real adaptation as a Ray Train job: labelled source frames, translated toward unlabelled target frames and
blended by IoU ranking, plus pseudo-labelled target frames and an optional output-space adversarial loss.

Epochs count from 0:
- [0, teacher_phase): source-only training; its result, frozen, is the teacher (skipped with `teacher_checkpoint`,
  which then also initialises the model when the architectures match);
- every later epoch re-translates this worker's source shard (fresh target pairings, so the style varies across
  epochs as in the segment job), scores the translations with the teacher and trains on the IRB mix;
- from `pseudo_start` on, the current model pseudo-labels the target shard at the start of each epoch (one
  self-training round per epoch, as in CBST), and target batches join every step with a cross-entropy on them.

`run(config)` is the driver side; `train_loop_per_worker` runs on each Ray Train worker.
Shapes: frames as loaded are (N, H, W, 3) uint8; network batches (B, 3, H, W); label maps (N, H, W).
"""

from __future__ import annotations

import copy
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from ray.train.torch import prepare_model

from training import loop
from training.adapt.adversarial import OutputDiscriminator, adversarial_losses
from training.adapt.blend import irb_mix, per_image_iou
from training.adapt.config import AdaptJobConfig, AdaptStyleConfig, PseudoConfig
from training.adapt.pseudo_labels import (
    IGNORE_INDEX,
    class_balanced_thresholds,
    mc_dropout_uncertainty,
    pseudo_labels,
)
from training.data.normalize import normalize, to_unit_bchw
from training.data.sources import load_data
from training.losses import masked_cross_entropy
from training.metrics import validation_metrics
from training.models.unet import Segmenter, UNetConfig
from training.segment.predict import predict_labels, score
from training.segment.train import TrainedSegmenter, augment
from training.style.generator_file import load_generator
from training.style.transforms import apply_style

CHUNK = 16  # frames per translation / labelling pass: ~1 M pixels at 256², plenty for per-class CBST quantiles


def translate(
    images_nhwc: np.ndarray,
    target_nhwc: np.ndarray,
    cfg: AdaptStyleConfig,
    rng: np.random.Generator,
    generator: torch.nn.Module | None = None,
) -> np.ndarray:
    """Each source frame moved toward the look of a random target frame (or through the learned `generator`);
    geometry kept, so its label still fits."""
    picks = rng.integers(len(target_nhwc), size=len(images_nhwc))
    out = np.empty_like(images_nhwc)
    for start in range(0, len(images_nhwc), CHUNK):
        stop = start + CHUNK
        styled = apply_style(
            cfg.method,
            to_unit_bchw(images_nhwc[start:stop]),
            to_unit_bchw(target_nhwc[picks[start:stop]]),
            cfg.beta,
            model=generator,
        )
        out[start:stop] = styled.mul(255).round_().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out


@torch.no_grad()
def label_targets(model: torch.nn.Module, target_nhwc: np.ndarray, cfg: PseudoConfig) -> np.ndarray:
    """(N, H, W) uint8 pseudo-labels; unconfident (and, with MC-dropout, uncertain) pixels are IGNORE_INDEX."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    labels = []
    for start in range(0, len(target_nhwc), CHUNK):
        batch = normalize(to_unit_bchw(target_nhwc[start : start + CHUNK]).to(device))
        uncertainty, u_max = None, None
        if cfg.uncertainty == "mc_dropout":
            probs, uncertainty = mc_dropout_uncertainty(model, batch, cfg.mc_passes)
            u_max = cfg.u_max
        else:
            probs = model(batch).softmax(dim=1)
        tau = cfg.tau if cfg.class_balanced is None else class_balanced_thresholds(probs, cfg.class_balanced, cfg.tau)
        labels.append(pseudo_labels(probs, tau, uncertainty, u_max).to(torch.uint8).cpu().numpy())
    model.train(was_training)
    return np.concatenate(labels)


def build_segmenter(model_config: dict[str, Any], weights: dict[str, torch.Tensor]) -> Segmenter:
    model = Segmenter(UNetConfig.model_validate(model_config), pretrained=False)
    model.load_state_dict(weights)
    return model


def mean_over_workers(values: dict[str, float], context: loop.WorkerContext) -> dict[str, float]:
    """Epoch averages over all workers, so rank 0 logs the whole job rather than its own shard."""
    if context.world == 1 or not dist.is_initialized() or not values:
        return values
    packed = torch.tensor(list(values.values()), dtype=torch.float64, device=context.device)
    dist.all_reduce(packed)
    return dict(zip(values, (packed / context.world).tolist(), strict=True))


def smallest_shard(size: int, context: loop.WorkerContext) -> int:
    """Every worker must take the same number of steps (DDP syncs each one), even if the shards differ by one."""
    if context.world == 1 or not dist.is_initialized():
        return size
    packed = torch.tensor([size], device=context.device)
    dist.all_reduce(packed, op=dist.ReduceOp.MIN)
    return int(packed.item())


def train_loop_per_worker(config_dict: dict) -> None:
    cfg = AdaptJobConfig.model_validate(config_dict["job"])
    tracking_uri = config_dict["tracking_uri"]
    context = loop.setup_worker(cfg.compute)
    images, masks = load_data(cfg.source, context.rank, context.world)
    if masks is None:
        raise ValueError(f"source data {cfg.source.describe()} has no labels; the adaptation job needs them")
    source_count = len(images)  # frames after this are extra labelled real frames: never translated
    if cfg.extra_labelled is not None:
        extra_images, extra_masks = load_data(cfg.extra_labelled, context.rank, context.world)
        images, masks = np.concatenate([images, extra_images]), np.concatenate([masks, extra_masks])
    target_images = load_data(cfg.target, context.rank, context.world)[0] if cfg.target else None
    val_images, val_masks = load_data(cfg.val) if (cfg.val and context.is_chief) else (None, None)
    generator = load_generator(cfg.style.translator, "style.translator") if cfg.style.method == "translator" else None

    model = Segmenter(cfg.model)
    optimizer, scheduler, scaler = loop.make_optimizer(
        model, cfg.compute, context, model.parameter_groups(cfg.compute.lr)
    )
    disc, disc_optimizer = None, None
    if cfg.adversarial.enabled:
        disc = OutputDiscriminator(cfg.model.num_classes, cfg.adversarial.width)
        disc_optimizer = torch.optim.Adam(disc.parameters(), lr=cfg.adversarial.lr, betas=(0.9, 0.99))
    teacher: Segmenter | None = None
    start_epoch = 0
    if (state := loop.load_state()) is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if disc is not None and "discriminator" in state:
            disc.load_state_dict(state["discriminator"])
            disc_optimizer.load_state_dict(state["discriminator_optimizer"])
        if "teacher" in state:
            teacher = build_segmenter(state["teacher"]["config"], state["teacher"]["model"])
        start_epoch = state["epoch"] + 1
        if context.is_chief:
            print(f"[{cfg.name}] resuming after epoch {state['epoch'] + 1}", flush=True)
    elif config_dict["teacher_file"]:
        saved = torch.load(config_dict["teacher_file"], map_location="cpu", weights_only=False)
        teacher = build_segmenter(saved["config"]["model"], saved["model"])
        # Fine-tune from the teacher when it has our architecture (dropout has no weights, so it may differ).
        if teacher.cfg.model_copy(update={"dropout": cfg.model.dropout}) == cfg.model:
            model.load_state_dict(saved["model"])
    if teacher is not None and teacher.cfg.num_classes != cfg.model.num_classes:
        raise ValueError(f"teacher has {teacher.cfg.num_classes} classes, model.num_classes is {cfg.model.num_classes}")
    teacher = teacher.to(context.device).eval() if teacher is not None else None
    distributed = context.world > 1 or context.device.type == "cuda"
    model = prepare_model(model) if distributed else model
    disc = prepare_model(disc) if (disc is not None and distributed) else disc

    batch_size = cfg.compute.batch_size
    steps = max(1, smallest_shard(len(images), context) // batch_size)
    for epoch in range(start_epoch, cfg.compute.epochs):
        started = time.perf_counter()
        rng = np.random.default_rng([cfg.compute.seed, context.rank, epoch])  # resumable: same draws after restart
        torch_rng = torch.Generator().manual_seed(int(rng.integers(2**62)))
        adapting = epoch >= cfg.teacher_phase
        if adapting and cfg.irb.enabled and teacher is None:  # the teacher phase just ended: freeze its result
            teacher = copy.deepcopy(loop.unwrap(model)).eval()
        stats: dict[str, float] = {}

        # The labelled mix: source frames during the teacher phase; then translated ones, IRB-blended if enabled.
        translated, ious, top, ratio = images, np.zeros(len(images)), 1.0, 0.0
        if adapting and cfg.style.method != "none":
            translated, ratio = images.copy(), 1.0
            translated[:source_count] = translate(images[:source_count], target_images, cfg.style, rng, generator)
            if cfg.irb.enabled:
                ious = per_image_iou(predict_labels(teacher, translated), masks, cfg.model.num_classes, IGNORE_INDEX)
                top, ratio = cfg.irb.top_fraction, cfg.irb.translated_ratio
                stats["irb_mean_iou"] = float(np.nanmean(ious))
        picks = irb_mix(len(images), ious, top, ratio, steps * batch_size, rng)

        # Target batches join once pseudo-labels or the adversarial loss need them: one forward for both domains.
        use_pseudo = cfg.pseudo.enabled and epoch >= cfg.pseudo_start
        use_adversarial = disc is not None and adapting
        use_target = use_pseudo or use_adversarial
        if use_target:
            target_order = np.resize(rng.permutation(len(target_images)), steps * batch_size)
        if use_pseudo:
            target_labels = label_targets(loop.unwrap(model), target_images, cfg.pseudo)
            stats["pseudo_coverage"] = float(np.mean(target_labels != IGNORE_INDEX))

        model.train()
        sums: dict[str, float] = {}
        for step in range(steps):
            chosen = picks[step * batch_size : (step + 1) * batch_size]
            frames = np.stack([(translated if kind == "translated" else images)[i] for kind, i in chosen])
            batch, labels = augment(
                to_unit_bchw(frames), torch.as_tensor(masks[[i for _, i in chosen]]).long(), cfg.augment, torch_rng
            )
            inputs = normalize(batch)
            if use_target:
                target_index = np.sort(target_order[step * batch_size : (step + 1) * batch_size])
                inputs = torch.cat([inputs, normalize(to_unit_bchw(target_images[target_index]))])
            inputs, labels = inputs.to(context.device), labels.to(context.device)
            with context.autocast():
                source_logits, target_logits = model(inputs).split([len(labels), len(inputs) - len(labels)])
                # Labelled frames may carry IGNORE_INDEX (pseudo-label sets with keep/ masks): skipped, like
                # the unkept pixels of the job's own pseudo-labels below.
                terms = {"loss_source": masked_cross_entropy(source_logits, labels)}
                loss = terms["loss_source"]
                if use_pseudo:
                    pseudo = torch.as_tensor(target_labels[target_index]).long().to(context.device)
                    terms["loss_pseudo"] = masked_cross_entropy(target_logits, pseudo)
                    loss = loss + cfg.pseudo.weight * terms["loss_pseudo"]
                if use_adversarial:
                    adversarial = adversarial_losses(disc, source_logits.softmax(dim=1), target_logits.softmax(dim=1))
                    terms |= {"loss_adv": adversarial.segmenter, "loss_disc": adversarial.discriminator}
                    loss = loss + cfg.adversarial.weight * adversarial.segmenter
            optimizer.zero_grad(set_to_none=True)
            if use_adversarial:
                # The two losses reach disjoint parameters (adversarial_losses cuts the paths): one backward for both.
                disc_optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss + terms["loss_disc"]).backward()
                scaler.step(disc_optimizer)
            else:
                scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            for key, value in (terms | {"train_loss": loss}).items():
                sums[key] = sums.get(key, 0.0) + value.item()
        scheduler.step()

        stats = mean_over_workers(stats | {key: value / steps for key, value in sums.items()}, context)
        metrics = {"epoch": epoch + 1, "resumed_after_epoch": start_epoch, "adapting": float(adapting)} | stats
        metrics["epoch_seconds"] = time.perf_counter() - started
        if val_images is not None:
            summary, _ = score(loop.unwrap(model), val_images, val_masks)
            metrics |= validation_metrics(summary)
        state = loop.optimiser_state(model, optimizer, scheduler)
        if teacher is not None:  # the checkpoint carries its teacher, so a resume needs neither the file nor a rerun
            state["teacher"] = {"model": teacher.state_dict(), "config": teacher.cfg.model_dump(mode="json")}
        if disc is not None:
            state["discriminator"] = loop.unwrap(disc).state_dict()
            state["discriminator_optimizer"] = disc_optimizer.state_dict()
        loop.end_epoch(cfg, tracking_uri, metrics, state, context, epoch)


def run(cfg: AdaptJobConfig, tracking_uri: str) -> TrainedSegmenter:
    """Run the job on the connected Ray cluster; returns the adapted model of the last checkpoint.

    `teacher_checkpoint` is resolved here, to fail before any worker starts; on a multi-node cluster it must lie on
    storage every node mounts (after the first checkpoint the teacher travels inside this job's checkpoints).
    """
    teacher_file = str(loop.checkpoint_state_file(cfg.teacher_checkpoint)) if cfg.teacher_checkpoint else None
    if cfg.style.method == "translator":  # fail before any worker starts; workers load it themselves
        load_generator(cfg.style.translator, "style.translator")
    state, result = loop.fit_job(
        train_loop_per_worker,
        {"job": cfg.model_dump(mode="json"), "tracking_uri": tracking_uri, "teacher_file": teacher_file},
        cfg,
    )
    model = build_segmenter(cfg.model.model_dump(), state["model"])
    return TrainedSegmenter(model.eval(), result.checkpoint.path, dict(result.metrics or {}))
