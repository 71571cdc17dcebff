"""Every checked-in recipe in configs/ loads as its job's typed config, and the benches that read them train what
they trained when the recipes were Python."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipelines.bench import bench_jobs
from pipelines.bench_adapt import BenchAdaptConfig, plan
from pipelines.bench_propagate import bench_config
from training.adapt.config import AdaptJobConfig
from training.config import CONFIGS_DIR, ConfigError, load_config, load_recipe, recipe_path
from training.data.sources import DataSpec
from training.loop import ComputeConfig
from training.models.unet import UNetConfig
from training.patient.config import PatientJobConfig
from training.propagate.config import PropagateJobConfig
from training.segment.config import SegmentJobConfig
from training.style.translator_config import TranslatorJobConfig
from training.tracking import TrackingConfig
from training.tune import SweepConfig, check_space

# A recipe's job, from its file name's prefix; a file matching none fails test_every_recipe_loads.
JOB_BY_PREFIX = {
    "segment": SegmentJobConfig,
    "adapt": AdaptJobConfig,
    "style-translator": TranslatorJobConfig,
    "propagate": PropagateJobConfig,
    "patient": PatientJobConfig,
    "sweep": SweepConfig,
}


def job_of(path: Path):
    for prefix, cls in JOB_BY_PREFIX.items():
        if path.suffix == ".yaml" and (path.stem == prefix or path.stem.startswith(f"{prefix}-")):
            return cls
    raise AssertionError(
        f"configs/{path.name}: no job for this name; name it <job>[-<what>].yaml, job in {(*JOB_BY_PREFIX,)}"
    )


@pytest.mark.parametrize("path", sorted(CONFIGS_DIR.iterdir()), ids=lambda p: p.name)
def test_every_recipe_loads(path, monkeypatch):
    # Relative paths in a recipe (data uri, sweep base) are relative to the repository root, where they are run.
    # Loading reads no data: a data section's uri is only made absolute.
    monkeypatch.chdir(CONFIGS_DIR.parent)
    job_of(path).model_validate(load_config(job_of(path), path).model_dump())


def test_a_recipe_of_no_known_job_fails():
    for name in ("job.yaml", "segmentation.yaml", "sweep.yml", "README.md"):
        with pytest.raises(AssertionError, match="no job for this name"):
            job_of(CONFIGS_DIR / name)
    assert job_of(CONFIGS_DIR / "segment-vocalfolds-fda.yaml") is SegmentJobConfig


def test_a_missing_recipe_is_named():
    with pytest.raises(ConfigError, match=r"recipe nope\.yaml not found: expected .*configs/nope\.yaml"):
        recipe_path("nope.yaml")


def test_an_installed_package_reads_the_recipes_from_endoflow_configs(tmp_path, monkeypatch):
    """The train image installs the package without the checkout; it ships configs/ and points here at it."""
    (tmp_path / "segment.yaml").write_text((CONFIGS_DIR / "segment.yaml").read_text())
    monkeypatch.setenv("ENDOFLOW_CONFIGS", str(tmp_path))
    assert recipe_path("segment.yaml") == tmp_path / "segment.yaml"
    with pytest.raises(ConfigError, match="propagate-bench.yaml not found.*ENDOFLOW_CONFIGS"):
        recipe_path("propagate-bench.yaml")


def old_bench_config(real_root: Path | None, runs_dir: str, seed: int) -> PropagateJobConfig:
    """bench_config as it was before configs/propagate-bench.yaml: its overrides, verbatim."""
    overrides = [
        "name=propagate-bench" if seed == 0 else f"name=propagate-bench-seed{seed}",
        f"compute.seed={seed}",
        f"runs_dir={runs_dir}",
        "data.size=256",
        "data.sim_frames=400",
        "data.sim_sequences=32",
        "deform.elastic=0.04",
        "stage1_epochs=6",
        "steps_per_epoch=150",
        "compute.epochs=45",
    ]
    if real_root is not None and (real_root / "img").is_dir():
        overrides.append(f"data.real={{kind: vocalfolds, uri: {real_root}, sequences: [seq1, seq2, seq3]}}")
        overrides.append(f"val={{kind: vocalfolds, uri: {real_root}, sequences: [seq4]}}")
    return load_config(PropagateJobConfig, None, overrides)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_propagation_bench_recipe_trains_what_bench_config_trained(tmp_path, seed):
    (tmp_path / "vocalfolds" / "img").mkdir(parents=True)
    for root in (tmp_path / "vocalfolds", tmp_path / "absent", None):
        runs = str(tmp_path / "runs")
        assert bench_config(root, runs, seed) == old_bench_config(root, runs, seed), root
    cfg = bench_config(tmp_path / "vocalfolds", seed=seed)
    assert cfg.compute.epochs == 45 and cfg.compute.seed == seed and cfg.runs_dir == "runs"
    assert cfg.name == ("propagate-bench" if seed == 0 else f"propagate-bench-seed{seed}")
    assert cfg.data.real.uri == cfg.val.uri == str(tmp_path / "vocalfolds")


def test_the_propagation_bench_recipe_run_by_hand_is_the_bench_network_on_the_shared_data(tmp_path, monkeypatch):
    (tmp_path / "img").mkdir()
    bench = bench_config(tmp_path)
    monkeypatch.chdir(CONFIGS_DIR.parent)
    by_hand = load_recipe(PropagateJobConfig, "propagate-bench.yaml")
    shared = os.path.abspath("../shared/data/vocalfolds")
    assert by_hand.data.real.uri == by_hand.val.uri == shared
    data = bench.data.model_copy(update={"real": bench.data.real.model_copy(update={"uri": shared})})
    assert by_hand == bench.model_copy(update={"data": data, "val": bench.val.model_copy(update={"uri": shared})})


def test_the_plain_propagation_recipe_is_the_job_defaults():
    assert load_recipe(PropagateJobConfig, "propagate.yaml") == PropagateJobConfig()


def old_bench_jobs(real_root: Path | None, epochs: int, runs_dir: str) -> dict[str, SegmentJobConfig]:
    """pipelines/bench.py's trainings as it built them before configs/segment.yaml, verbatim."""
    if real_root is not None and (real_root / "img").is_dir():
        train = DataSpec(kind="vocalfolds", uri=str(real_root), sequences=["seq1", "seq2", "seq3"])
        evaluate = DataSpec(kind="vocalfolds", uri=str(real_root), sequences=["seq4"])
    else:
        train = DataSpec(kind="sim", style="real-like", count=240, seed=10)
        evaluate = DataSpec(kind="sim", style="real-like", count=96, seed=2000)
    models = {"default": UNetConfig(), "plain_unet": UNetConfig.plain()}
    return {
        name: SegmentJobConfig(
            name=f"bench-{name}",
            runs_dir=runs_dir,
            source=train,
            val=evaluate,
            model=model_cfg,
            compute=ComputeConfig(epochs=epochs, workers=2, batch_size=4),
            tracking=TrackingConfig(experiment="endoflow-bench"),
        )
        for name, model_cfg in models.items()
    }


def test_the_segment_bench_trains_what_it_trained_before_its_recipe_was_a_file(tmp_path):
    (tmp_path / "vocalfolds" / "img").mkdir(parents=True)
    for root in (tmp_path / "vocalfolds", tmp_path / "absent", None):
        for epochs in (30, 2):
            data, jobs = bench_jobs(root, epochs, str(tmp_path / "runs"), ("default", "plain_unet"))
            assert jobs == old_bench_jobs(root, epochs, str(tmp_path / "runs")), (root, epochs)
            assert data.startswith("vocalfolds" if root == tmp_path / "vocalfolds" else "embedded simulator")
    assert jobs["plain_unet"].model == UNetConfig.plain() and jobs["default"].model == UNetConfig()


def test_the_segment_recipe_run_by_hand_is_the_benched_default_model(monkeypatch):
    monkeypatch.chdir(CONFIGS_DIR.parent)
    shared = Path("../shared/data/vocalfolds")
    by_hand = load_recipe(SegmentJobConfig, "segment.yaml")
    benched = old_bench_jobs(None, 30, "runs")["default"]  # its data is checked apart: no data needed here
    assert by_hand.source.uri == by_hand.val.uri == os.path.abspath(shared)
    assert (by_hand.source.sequences, by_hand.val.sequences) == (["seq1", "seq2", "seq3"], ["seq4"])
    same = {"name": by_hand.name, "tracking": by_hand.tracking, "source": by_hand.source, "val": by_hand.val}
    assert by_hand == benched.model_copy(update=same)


def trained(cfg, **update) -> dict:
    """What a job trains: its dump with `update`, less the simulator-only keys of a data section read from disk."""
    tree = cfg.model_copy(update=update).model_dump(mode="json")
    for section in tree.values():
        if isinstance(section, dict) and section.get("kind") not in (None, "sim"):
            for key in ("style", "count", "seed"):
                section.pop(key)
    return tree


@pytest.mark.parametrize(("recipe", "rung"), [("adapt.yaml", "irb"), ("style-translator.yaml", "translator_training")])
def test_the_adaptation_recipes_are_the_vocalfolds_ladders_jobs(recipe, rung, monkeypatch):
    """configs/adapt.yaml and style-translator.yaml train what `make bench-adapt`'s vocalfolds ladder trains (its
    best rung, and its translator), from its source-only run, under their own name, storage and experiment."""
    monkeypatch.chdir(CONFIGS_DIR.parent)
    ladder = BenchAdaptConfig(real_data="../shared/data/vocalfolds", runs_dir="runs/bench/adapt-vocalfolds")
    benched = plan(ladder).jobs[rung]
    by_hand = load_recipe(type(benched), recipe)
    checkpoint = "teacher_checkpoint" if rung == "irb" else "segmenter_checkpoint"  # the ladder's source_only run
    assert str(Path(getattr(by_hand, checkpoint)).resolve()) == getattr(benched, checkpoint)
    own = {"name": by_hand.name, "runs_dir": by_hand.runs_dir, "tracking": by_hand.tracking, checkpoint: None}
    if rung == "irb":
        assert benched.val is None and by_hand.val.sequences == ladder.eval_sequences  # scored every epoch here
        own["val"] = by_hand.val
    assert trained(by_hand, **own) == trained(benched, **own)
    assert by_hand.target.uri == os.path.abspath("../shared/data/vocalfolds") and not by_hand.target.labelled


def test_the_sweep_recipe_is_the_k8s_sweep_selecting_without_seq4(monkeypatch):
    monkeypatch.chdir(CONFIGS_DIR.parent)
    local = load_recipe(SweepConfig, "sweep.yaml")
    k8s = load_config(SweepConfig, CONFIGS_DIR.parent / "k8s/base/config/sweep.yaml")
    assert (local.base, local.runs_dir, k8s.base, k8s.runs_dir) == (
        "configs/adapt-vocalfolds-select.yaml",
        "runs",
        "/config/job.yaml",
        "/runs",
    )
    searched = ("job", "metric", "mode", "scheduler", "space")  # trials and concurrency follow the machine
    assert {key: getattr(local, key) for key in searched} == {key: getattr(k8s, key) for key in searched}
    base = check_space(local)  # the base loads as the sweep's job, and every bound of the space passes through it
    assert isinstance(base, AdaptJobConfig)
    # seq4 is the development test: the sweep neither trains on it nor selects on it.
    assert base.val.sequences == ["seq3"] and "seq4" not in base.target.sequences + base.val.sequences


def test_the_segment_bench_trains_the_pretrained_variant_with_the_same_recipe(tmp_path):
    data, jobs = bench_jobs(None, 30, str(tmp_path / "runs"))
    assert list(jobs) == ["default", "lite0_imagenet", "plain_unet"]
    lite0, default = jobs["lite0_imagenet"], jobs["default"]
    assert lite0.model.encoder == "lite0-imagenet" and default.model.encoder == "scratch"
    assert lite0.model_copy(update={"name": default.name, "model": default.model}) == default
    with pytest.raises(ValueError, match="unknown bench models \\['resnet'\\]"):
        bench_jobs(None, 30, str(tmp_path / "runs"), ("default", "resnet"))
