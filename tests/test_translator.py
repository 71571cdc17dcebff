"""The learned translator: model shapes and losses, label preservation on a toy case, the Ray Train job (one tiny
epoch, resume, MLflow sample grids, export) and the exported generator in the adapt job's style section."""

import mlflow
import pytest
import torch
from torch import nn

from training.config import load_config
from training.models.translator import Generator, PatchDiscriminator, TranslatorConfig, patch_nce_loss
from training.style import translator_train
from training.style.generator_file import load_generator, save_generator
from training.style.translator_config import TranslatorJobConfig, TranslatorLossConfig
from training.style.translator_train import TranslatorParts, structure_loss, train_step

SMALL = TranslatorConfig(width=4, blocks=1, disc_width=8, disc_layers=2, head_width=16)


def test_generator_starts_as_identity_and_discriminator_judges_patches():
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(Generator(SMALL)(x), x)
    assert PatchDiscriminator(SMALL)(x).shape[:2] == (2, 1)
    with pytest.raises(ValueError, match="multiples of 4"):
        Generator(SMALL)(torch.zeros(1, 3, 30, 32))


def test_patch_nce_prefers_the_patch_at_the_same_place():
    keys = torch.nn.functional.normalize(torch.randn(2, 16, 8), dim=-1)
    aligned = patch_nce_loss(keys, keys)
    shuffled = patch_nce_loss(keys[:, torch.randperm(16)], keys)
    assert aligned < shuffled


def test_structure_loss_ignores_colour_but_sees_geometry():
    x = torch.zeros(1, 3, 32, 32) - 0.8
    x[..., 8:24, 8:24] = 0.6
    recoloured = x * 0.5 + 0.2  # brighter, lower contrast: same edges
    moved = torch.roll(x, shifts=6, dims=-1)
    assert structure_loss(x, recoloured) < 0.01
    assert structure_loss(x, moved) > 0.3


class BrightnessSegmenter(nn.Module):
    """A frozen toy segmenter on normalised input: class 1 where the pixel is brighter than mid-grey."""

    def forward(self, normalised: torch.Tensor) -> torch.Tensor:
        bright = normalised.mean(dim=1, keepdim=True) * 4
        return torch.cat([-bright, bright], dim=1)


def toy_accuracy(semantic: float) -> float:
    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny tensors: more threads only contend on a shared machine
    source = torch.full((4, 3, 32, 32), -0.6)
    source[..., 16:] = 0.6  # right half bright: label 1
    labels = (source[:, 0] > 0).long()
    target = torch.full((4, 3, 32, 32), -0.7)  # the "real" domain is uniformly dark
    parts = TranslatorParts.create(SMALL, lr=5e-3)
    weights = TranslatorLossConfig(nce=0.0, structure=0.0, semantic=semantic, nce_patches=8)
    segmenter = BrightnessSegmenter().requires_grad_(False)
    for _ in range(25):
        terms = train_step(parts, source, target, weights, segmenter, labels)
    assert all(v == v for v in terms.values())  # finite losses
    with torch.no_grad():
        translated = parts.generator(source)
    predicted = segmenter((translated + 1) / 2 * 4 - 2).argmax(1)  # any monotone map keeps the sign test
    return (predicted == labels).float().mean().item()


def test_semantic_term_keeps_the_frozen_segmenters_labels():
    # The GAN alone darkens the bright half toward the dark target domain; the semantic term keeps it labelled 1.
    without, with_semantic = toy_accuracy(0.0), toy_accuracy(5.0)
    assert with_semantic >= 0.95
    assert with_semantic > without


def test_generator_file_round_trip_and_errors(tmp_path):
    generator = Generator(SMALL)
    path = save_generator(generator, tmp_path / "g.pt")
    loaded = load_generator(path)
    assert loaded.cfg == SMALL
    with pytest.raises(FileNotFoundError, match="style.translator: translator file .*missing.pt"):
        load_generator(tmp_path / "missing.pt", "style.translator")
    (tmp_path / "junk.pt").write_text("not torch")
    with pytest.raises(ValueError, match="junk.pt is not a translator file"):
        load_generator(tmp_path / "junk.pt")


TINY = [
    "source.count=8",
    "source.size=32",
    "target.count=8",
    "target.size=32",
    "model.width=4",
    "model.blocks=1",
    "model.disc_width=8",
    "model.disc_layers=2",
    "model.head_width=16",
    "loss.nce_patches=8",
    "compute.workers=2",
    "compute.batch_size=2",
    "samples=2",
    "compute.max_failures=0",
]


@pytest.mark.slow
def test_translator_job_trains_logs_grids_resumes_and_exports(ray_session, tmp_path):
    from training import tracking

    overrides = ["name=cut-smoke", f"runs_dir={tmp_path}", "compute.epochs=1", *TINY]
    cfg = load_config(TranslatorJobConfig, None, overrides)
    uri = tracking.use_tracking(cfg.tracking, tmp_path)
    with mlflow.start_run() as run:
        cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"run_id": run.info.run_id})})
        path, metrics = translator_train.run(cfg, uri)
    assert metrics["epoch"] == 1 and {"loss_gan", "loss_nce", "loss_structure", "loss_d"} <= metrics.keys()
    assert load_generator(path).cfg.width == 4
    grids = mlflow.tracking.MlflowClient(uri).list_artifacts(run.info.run_id, "samples")
    assert [g.path for g in grids] == ["samples/epoch_001.png"]

    resumed_cfg = load_config(TranslatorJobConfig, None, [*overrides, "compute.epochs=2"])
    _, resumed = translator_train.run(resumed_cfg, uri)
    assert resumed["epoch"] == 2 and resumed["resumed_after_epoch"] == 1
