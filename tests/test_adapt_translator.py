"""The adapt job's learned-translator rung and its extra labelled real frames: config checks, the layout guess of
`--extra-labelled`, the translation step with a generator file, and one tiny Ray run using both."""

import json

import numpy as np
import pytest

from training.adapt import train as adapt_train
from training.adapt.config import AdaptJobConfig, AdaptStyleConfig, extra_labelled_override
from training.config import ConfigError, load_config
from training.data.folders import write_folder_dataset
from training.data.sources import DataSpec, load_data
from training.models.translator import Generator, TranslatorConfig
from training.style.generator_file import load_generator, save_generator


def test_translator_style_needs_a_file_and_extra_labelled_follows_the_source(tmp_path):
    with pytest.raises(ConfigError, match="style.translator"):
        load_config(AdaptJobConfig, None, ["style.method=translator"])
    cfg = load_config(AdaptJobConfig, None, [f"extra_labelled={{kind: folder, uri: {tmp_path}, size: 64}}"])
    assert cfg.extra_labelled.size == cfg.source.size
    with pytest.raises(ConfigError, match="extra_labelled must be labelled"):
        load_config(AdaptJobConfig, None, [f"extra_labelled={{kind: folder, uri: {tmp_path}, labelled: false}}"])


def test_extra_labelled_layout_is_guessed(tmp_path):
    assert json.loads(extra_labelled_override(str(tmp_path)).split("=", 1)[1])["kind"] == "folder"
    (tmp_path / "img").mkdir()
    (tmp_path / "annot").mkdir()
    assert json.loads(extra_labelled_override(str(tmp_path)).split("=", 1)[1])["kind"] == "vocalfolds"


def test_translate_runs_the_generator(tmp_path):
    generator = load_generator(save_generator(Generator(TranslatorConfig(width=4, blocks=1)), tmp_path / "g.pt"))
    with_bias = generator.decoder[-1]
    with_bias.bias.data.fill_(-0.5)  # a learned darkening: every pixel moves down
    images = load_data(DataSpec(kind="sim", count=2, size=32))[0]
    style = AdaptStyleConfig(method="translator", translator=str(tmp_path / "g.pt"))
    out = adapt_train.translate(images, images, style, np.random.default_rng(0), generator)
    assert out.shape == images.shape and out.mean() < images.mean() - 20


@pytest.mark.slow
def test_tiny_run_with_translator_and_extra_labelled(ray_session, tmp_path):
    generator_file = save_generator(Generator(TranslatorConfig(width=4, blocks=1)), tmp_path / "g.pt")
    extra_images, extra_masks = load_data(DataSpec(kind="sim", style="real-like", count=4, size=48, seed=7))
    write_folder_dataset(str(tmp_path / "extra"), extra_images, extra_masks)
    overrides = [
        "name=adapt-translator",
        f"runs_dir={tmp_path}",
        "source.count=8",
        "source.size=32",
        "target.count=8",
        "target.size=32",
        "style.method=translator",
        f"style.translator={generator_file}",
        "irb.enabled=false",
        "pseudo.enabled=false",
        "teacher_epochs=0",
        extra_labelled_override(str(tmp_path / "extra")),
        "model.base_width=8",
        "model.depth=2",
        "model.blocks_per_level=1",
        "compute.epochs=1",
        "compute.workers=2",
        "compute.batch_size=2",
        "compute.max_failures=0",
    ]
    cfg = load_config(AdaptJobConfig, None, overrides)
    assert cfg.extra_labelled.kind == "folder" and cfg.extra_labelled.size == 32
    trained = adapt_train.run(cfg, f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert trained.metrics["epoch"] == 1 and trained.metrics["adapting"] == 1.0
    assert trained.metrics["loss_source"] > 0
