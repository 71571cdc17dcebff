"""The learned sim → real translator (CUT + content terms) as a Ray Train job, trained from scratch.

Each step: the PatchGAN learns to tell real target frames from translations (LSGAN); the generator learns to fool it
while PatchNCE ties every translated patch to its source patch, an edge-structure term keeps the geometry, and (with
`segmenter_checkpoint`) a frozen source-trained segmenter must still read the simulator label from the translation.

Data parallelism: three networks run several forwards per step, so rather than wrapping each in DDP the workers start
from rank 0's weights and average their gradients after every backward — the same arithmetic as DDP, without its
one-forward-per-backward rule. A checkpoint every epoch; the same run name resumes. The chief logs a
source | translated | real grid per epoch to MLflow, and `run` exports the generator (generator_file.py).
Shapes: frames (N, H, W, 3) uint8; network batches (B, 3, H, W) in [-1, 1].
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from training import loop
from training.data.normalize import normalize, to_unit_bchw
from training.data.sources import load_data
from training.losses import masked_cross_entropy
from training.models.translator import (
    Generator,
    PatchDiscriminator,
    PatchHeads,
    TranslatorConfig,
    patch_nce_loss,
    to_signed,
    to_unit,
)
from training.models.unet import Segmenter, UNetConfig
from training.style.generator_file import save_generator
from training.style.translator_config import TranslatorJobConfig, TranslatorLossConfig

_SOBEL = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def edge_magnitude(signed_bchw: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) Sobel edge magnitude of the luminance, divided by its per-image mean (contrast-invariant)."""
    grey = signed_bchw.mean(dim=1, keepdim=True)
    kernels = torch.stack([_SOBEL, _SOBEL.T]).unsqueeze(1).to(grey)
    gradient = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), kernels)
    magnitude = gradient.pow(2).sum(dim=1, keepdim=True).add(1e-6).sqrt()
    return magnitude / magnitude.mean(dim=(2, 3), keepdim=True).clamp_min(1e-3)


def structure_loss(source_signed: torch.Tensor, translated_signed: torch.Tensor) -> torch.Tensor:
    return F.l1_loss(edge_magnitude(translated_signed), edge_magnitude(source_signed))


def nce_loss(
    generator: Generator, heads: PatchHeads, source: torch.Tensor, translated: torch.Tensor, patches: int, tau: float
) -> torch.Tensor:
    """PatchNCE over every encoder stage: queries from the translation, keys from the source, same positions."""
    queries, keys = generator.encode(translated), generator.encode(source)
    total = source.new_zeros(())
    for stage, (q, k) in enumerate(zip(queries, keys, strict=True)):
        positions = torch.randperm(q.shape[2] * q.shape[3], device=q.device)[:patches]
        total = total + patch_nce_loss(heads(q, stage, positions), heads(k, stage, positions), tau)
    return total / len(queries)


def load_segmenter(path: str) -> Segmenter:

    saved = torch.load(loop.checkpoint_state_file(path), map_location="cpu", weights_only=False)
    model_cfg = saved["config"]["model"] if "model" in saved["config"] else saved["config"]
    model = Segmenter(UNetConfig.model_validate(model_cfg), pretrained=False)
    model.load_state_dict(saved["model"])
    return model.eval().requires_grad_(False)


@dataclass
class TranslatorParts:
    generator: Generator
    heads: PatchHeads
    discriminator: PatchDiscriminator
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer

    @classmethod
    def create(cls, model_cfg: TranslatorConfig, lr: float) -> TranslatorParts:
        generator, discriminator = Generator(model_cfg), PatchDiscriminator(model_cfg)
        heads = PatchHeads(generator.feature_channels, model_cfg.head_width)
        betas = (0.5, 0.999)  # the GAN-standard Adam settings (CycleGAN/CUT)
        opt_g = torch.optim.Adam([*generator.parameters(), *heads.parameters()], lr=lr, betas=betas)
        opt_d = torch.optim.Adam(discriminator.parameters(), lr=lr, betas=betas)
        return cls(generator, heads, discriminator, opt_g, opt_d)


def train_step(
    parts: TranslatorParts,
    x: torch.Tensor,
    y: torch.Tensor,
    weights: TranslatorLossConfig,
    segmenter: torch.nn.Module | None = None,
    labels: torch.Tensor | None = None,
) -> dict[str, float]:
    """One discriminator and one generator update on source `x` and target `y` (both in [-1, 1]); the loss terms.
    With a frozen `segmenter` and the source `labels`, the semantic term joins the generator loss."""
    fake = parts.generator(x)

    # Discriminator: real target frames → 1, translations → 0 (least squares).
    real_logits, fake_logits = parts.discriminator(y), parts.discriminator(fake.detach())
    loss_d = 0.5 * (
        F.mse_loss(real_logits, torch.ones_like(real_logits)) + F.mse_loss(fake_logits, torch.zeros_like(fake_logits))
    )
    parts.opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    _average_gradients([parts.discriminator])
    parts.opt_d.step()

    # Generator: fool the discriminator, keep the content (PatchNCE, edge structure, frozen-segmenter labels).
    fooled = parts.discriminator(fake)
    terms = {"loss_gan": F.mse_loss(fooled, torch.ones_like(fooled))}
    terms["loss_nce"] = nce_loss(parts.generator, parts.heads, x, fake, weights.nce_patches, weights.nce_temperature)
    terms["loss_structure"] = structure_loss(x, fake)
    loss_g = weights.gan * terms["loss_gan"] + weights.nce * terms["loss_nce"]
    loss_g = loss_g + weights.structure * terms["loss_structure"]
    if segmenter is not None and labels is not None and weights.semantic > 0:
        # Source labels may hold IGNORE_INDEX (a folder source with keep/ masks): those pixels are skipped.
        terms["loss_semantic"] = masked_cross_entropy(segmenter(normalize(to_unit(fake))), labels)
        loss_g = loss_g + weights.semantic * terms["loss_semantic"]
    parts.opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    _average_gradients([parts.generator, parts.heads])
    parts.opt_g.step()
    return {key: value.item() for key, value in (terms | {"loss_d": loss_d, "loss_g": loss_g}).items()}


def _sync_start(modules: list[torch.nn.Module]) -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        for module in modules:
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor.data, src=0)


def _average_gradients(modules: list[torch.nn.Module]) -> None:
    if dist.is_initialized() and (world := dist.get_world_size()) > 1:
        for module in modules:
            for p in module.parameters():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
                p.grad /= world


def sample_grid(generator: Generator, source_nhwc: np.ndarray, target_nhwc: np.ndarray, rows: int) -> np.ndarray:
    """(rows·H, 3·W, 3) uint8: source | translated | real, one row per sample."""
    rows = min(rows, len(source_nhwc), len(target_nhwc))
    source_nhwc = source_nhwc[:rows]
    with torch.no_grad():
        translated = to_unit(generator.eval()(to_signed(to_unit_bchw(source_nhwc))))
    generator.train()
    translated_nhwc = translated.mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    target = target_nhwc[:rows]
    if target.shape[1:3] != source_nhwc.shape[1:3]:
        resized = F.interpolate(to_unit_bchw(target), size=source_nhwc.shape[1:3], mode="bilinear", antialias=True)
        target = resized.mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return np.concatenate(
        [np.concatenate([s, t, r], axis=1) for s, t, r in zip(source_nhwc, translated_nhwc, target, strict=True)]
    )


def _log_grid(tracking_uri: str, run_id: str | None, grid: np.ndarray, epoch: int) -> None:
    if run_id is None:
        return
    from mlflow.tracking import MlflowClient

    from training.visualize import save_png

    with tempfile.TemporaryDirectory() as directory:
        path = save_png(grid, Path(directory) / f"epoch_{epoch:03d}.png")
        MlflowClient(tracking_uri).log_artifact(run_id, str(path), artifact_path="samples")


def train_loop_per_worker(config_dict: dict) -> None:
    cfg = TranslatorJobConfig.model_validate(config_dict["job"])
    tracking_uri = config_dict["tracking_uri"]
    context = loop.setup_worker(cfg.compute)
    source, masks = load_data(cfg.source, context.rank, context.world)
    target = load_data(cfg.target, context.rank, context.world)[0]
    segmenter = load_segmenter(config_dict["segmenter_file"]) if config_dict["segmenter_file"] else None
    use_semantic = segmenter is not None and cfg.loss.semantic > 0 and masks is not None

    parts = TranslatorParts.create(cfg.model, cfg.compute.lr)
    generator, opt_g, opt_d = parts.generator, parts.opt_g, parts.opt_d
    networks = [generator, parts.heads, parts.discriminator]
    start_epoch = 0
    if (state := loop.load_state()) is not None:
        for module, key in zip(networks, ["generator", "heads", "discriminator"], strict=True):
            module.load_state_dict(state[key])
        opt_g.load_state_dict(state["opt_g"])
        opt_d.load_state_dict(state["opt_d"])
        start_epoch = state["epoch"] + 1
        if context.is_chief:
            print(f"[{cfg.name}] resuming after epoch {start_epoch}", flush=True)
    else:
        _sync_start(networks)
    for module in [*networks, *([segmenter] if segmenter else [])]:
        module.to(context.device)

    batch_size = cfg.compute.batch_size
    steps = max(1, min(len(source), len(target)) // batch_size)
    if dist.is_initialized() and dist.get_world_size() > 1:  # equal step counts: every step all-reduces
        packed = torch.tensor([steps])
        dist.all_reduce(packed, op=dist.ReduceOp.MIN)
        steps = int(packed.item())
    for epoch in range(start_epoch, cfg.compute.epochs):
        started = time.perf_counter()
        rng = np.random.default_rng([cfg.compute.seed, context.rank, epoch])
        torch.manual_seed(int(rng.integers(2**62)))  # PatchNCE positions: resumable draws
        source_order, target_order = rng.permutation(len(source)), rng.permutation(len(target))
        sums: dict[str, float] = {}
        for step in range(steps):
            picks = np.sort(source_order[step * batch_size : (step + 1) * batch_size])
            x = to_signed(to_unit_bchw(source[picks])).to(context.device)
            y = to_signed(to_unit_bchw(target[np.sort(target_order[step * batch_size : (step + 1) * batch_size])]))
            y = y.to(context.device)
            labels = torch.as_tensor(masks[picks]).long().to(context.device) if use_semantic else None
            terms = train_step(parts, x, y, cfg.loss, segmenter if use_semantic else None, labels)
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + value

        metrics = {"epoch": epoch + 1, "resumed_after_epoch": start_epoch} | {k: v / steps for k, v in sums.items()}
        metrics["epoch_seconds"] = time.perf_counter() - started
        if context.is_chief:
            _log_grid(tracking_uri, cfg.tracking.run_id, sample_grid(generator, source, target, cfg.samples), epoch + 1)
        state = {
            key: module.state_dict()
            for key, module in zip(["generator", "heads", "discriminator"], networks, strict=True)
        }
        state |= {"opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict()}
        loop.end_epoch(cfg, tracking_uri, metrics, state, context, epoch)


def run(cfg: TranslatorJobConfig, tracking_uri: str) -> tuple[Path, dict]:
    """Train on the connected Ray cluster and export the generator; returns (generator file, last metrics).
    `tracking_uri` with `cfg.tracking.run_id` set: per-epoch metrics and sample grids go into that MLflow run."""
    segmenter_file = None
    if cfg.segmenter_checkpoint and cfg.loss.semantic > 0:
        segmenter_file = str(loop.checkpoint_state_file(cfg.segmenter_checkpoint))
    state, result = loop.fit_job(
        train_loop_per_worker,
        {"job": cfg.model_dump(mode="json"), "tracking_uri": tracking_uri, "segmenter_file": segmenter_file},
        cfg,
    )
    generator = Generator(cfg.model)
    generator.load_state_dict(state["generator"])
    return save_generator(generator, cfg.generator_file), dict(result.metrics or {})
