"""The adaptation job: a tiny 2-worker run through every rung (teacher phase, FDA + IRB, MC-dropout pseudo-labels,
adversarial), its resume, its teacher lookup, and the config's cross-section checks."""

import pytest
import torch
from typer.testing import CliRunner

from pipelines.cli import app
from training.adapt import train as adapt_train
from training.adapt.config import AdaptJobConfig
from training.config import ConfigError, load_config
from training.loop import checkpoint_state_file

pytestmark = pytest.mark.slow

TINY = [
    "source.count=16",
    "source.size=64",
    "target.count=16",
    "target.size=64",
    "val={kind: sim, style: real-like, count: 4, size: 64, seed: 2}",
    "model.base_width=8",
    "model.depth=2",
    "model.blocks_per_level=1",
    "compute.workers=2",
    "compute.batch_size=4",
    "teacher_epochs=1",
    "pseudo.start_epoch=1",
]


def tiny_job(tmp_path, epochs: int, *extra: str) -> AdaptJobConfig:
    overrides = ["name=adapt-smoke", f"runs_dir={tmp_path}", f"compute.epochs={epochs}", *TINY, *extra]
    return load_config(AdaptJobConfig, None, overrides)


def test_tiny_adaptation_run_resumes_and_keeps_its_teacher(ray_session, tmp_path):
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    extra = [
        "pseudo.uncertainty=mc_dropout",
        "pseudo.mc_passes=2",
        "pseudo.u_max=2.0",
        "adversarial.enabled=true",
        "adversarial.width=8",
    ]
    first = adapt_train.run(tiny_job(tmp_path, 2, *extra), tracking_uri)
    metrics = first.metrics
    assert metrics["epoch"] == 2 and metrics["resumed_after_epoch"] == 0 and metrics["adapting"] == 1.0
    assert 0.0 < metrics["pseudo_coverage"] <= 1.0  # u_max near log(7): an untrained model's pixels pass too
    assert 0.0 <= metrics["val_mean_dice"] <= 1.0 and 0.0 <= metrics["irb_mean_iou"] <= 1.0
    assert {"loss_source", "loss_pseudo", "loss_adv", "loss_disc", "train_loss"} <= metrics.keys()
    assert first.model.cfg.dropout > 0  # switched on for MC-dropout

    # The run's directory is a valid teacher_checkpoint, and its checkpoint carries the teacher and discriminator.
    state = torch.load(checkpoint_state_file(str(tmp_path / "ray" / "adapt-smoke")), weights_only=False)
    assert state["epoch"] == 1 and {"teacher", "discriminator", "discriminator_optimizer"} <= state.keys()

    # Same name and storage, one more epoch: it continues after epoch 2 instead of starting over.
    second = adapt_train.run(tiny_job(tmp_path, 3, *extra), tracking_uri)
    assert second.metrics["epoch"] == 3 and second.metrics["resumed_after_epoch"] == 2


def test_missing_teacher_checkpoint_fails_before_training(tmp_path):
    cfg = tiny_job(tmp_path, 2, f"teacher_checkpoint={tmp_path / 'nowhere'}")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        adapt_train.run(cfg, f"sqlite:///{tmp_path / 'mlflow.db'}")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["target=null"], "needs a 'target'"),
        (
            [
                "target=null",
                "style.method=none",
                "irb.enabled=false",
                "pseudo.enabled=false",
                "adversarial.enabled=true",
            ],
            "adversarial.enabled needs a 'target'",
        ),
        (["target.labelled=true"], "target must be unlabelled"),
        (["target.size=32"], "target.size 32 must equal source.size 64"),
        (["val.labelled=false"], "val must be labelled"),
        (["style.method=none"], "irb.enabled .* needs a style.method"),
        (["teacher_epochs=0"], "need a teacher"),
        (["pseudo.start_epoch=0"], "falls in the source-only teacher phase"),
        (["compute.epochs=1"], "leaves no adaptation epoch"),
        (["pseudo.uncertainty=entropy"], "pseudo.uncertainty"),
    ],
)
def test_config_errors_say_what_to_fix(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_job(tmp_path, 2, *overrides)


def test_defaults_are_valid_and_a_teacher_checkpoint_replaces_the_teacher_phase():
    cfg = AdaptJobConfig()
    assert cfg.style.method == "fda" and cfg.irb.enabled and cfg.pseudo.enabled and not cfg.adversarial.enabled
    assert cfg.pseudo_start == cfg.teacher_phase == cfg.teacher_epochs
    with_teacher = load_config(AdaptJobConfig, None, ["teacher_checkpoint=runs/ray/segment", "pseudo.start_epoch=0"])
    assert with_teacher.teacher_phase == 0 and with_teacher.pseudo_start == 0


def test_cli_reports_config_errors_with_exit_code_2():
    result = CliRunner().invoke(app, ["adapt", "train", "--set", "pseudo.start_epoch=0"])
    assert result.exit_code == 2 and "teacher phase" in result.output
