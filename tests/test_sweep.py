"""`endoflow sweep`: search-space parsing and checks (fast), and a 2-trial Ray Tune sweep of a tiny segment job."""

from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from ray.tune.search.sample import Categorical, Float, Integer

from training.adapt.config import AdaptJobConfig
from training.config import ConfigError, load_config
from training.segment.config import SegmentJobConfig
from training.tune import SweepConfig, build_search_space, check_space

ROOT = Path(__file__).resolve().parents[1]
TINY_JOB = {
    "source": {"count": 8, "size": 64},
    "val": {"kind": "sim", "style": "real-like", "count": 4, "size": 64},
    "model": {"base_width": 8, "depth": 2, "blocks_per_level": 1},
    "compute": {"workers": 1, "batch_size": 4, "epochs": 2},
}


def test_build_search_space_gives_tune_samplers_under_the_dotted_keys():
    space = build_search_space(
        {
            "compute.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
            "style.beta": {"type": "uniform", "low": 0.005, "high": 0.02},
            "compute.batch_size": {"type": "randint", "low": 2, "high": 5},
            "style.method": {"type": "choice", "values": ["fda", "lab"]},
        }
    )
    assert isinstance(space["compute.lr"], Float) and isinstance(space["style.beta"], Float)
    assert isinstance(space["compute.batch_size"], Integer) and isinstance(space["style.method"], Categorical)
    assert 1e-4 <= space["compute.lr"].sample() <= 1e-2
    assert space["compute.batch_size"].sample() in (2, 3, 4)  # high excluded, as in Ray
    assert space["style.method"].categories == ["fda", "lab"]


@pytest.mark.parametrize(
    "spec",
    [
        {"type": "loguniform", "low": 0, "high": 0.1},
        {"type": "uniform", "low": 0.2, "high": 0.1},
        {"type": "choice", "values": []},
        {"type": "randint", "low": 1.5, "high": 4},
        {"type": "normal", "low": 0, "high": 1},
    ],
)
def test_malformed_spec_names_its_key(spec):
    with pytest.raises(ConfigError, match="style.beta"):
        build_search_space({"style.beta": spec})
    with pytest.raises(ConfigError, match="space.style.beta"):  # the same through a sweep file / --set
        load_config(SweepConfig, None, [f"space={{style.beta: {yaml.safe_dump(spec, default_flow_style=True)}}}"])


def test_space_is_checked_against_the_job_config_before_any_trial():
    def sweep(space: str, **extra) -> SweepConfig:
        return SweepConfig.model_validate({"base": TINY_JOB, "space": yaml.safe_load(space)} | extra)

    with pytest.raises(ConfigError, match="compute.lrr"):  # not a field
        check_space(sweep("{compute.lrr: {type: uniform, low: 0.001, high: 0.01}}"))
    with pytest.raises(ConfigError, match="style.beta"):  # the upper bound breaks the field's own limit
        check_space(sweep("{style.beta: {type: uniform, low: 0.01, high: 0.9}}"))
    with pytest.raises(ConfigError, match="needs 'val'"):
        check_space(sweep("{compute.lr: {type: choice, values: [0.001]}}", base=TINY_JOB | {"val": None}))
    with pytest.raises(ConfigError, match="job 'detect'"):
        load_config(SweepConfig, None, ["job=detect", "space={}"])
    assert isinstance(check_space(sweep("{augment.hflip: {type: choice, values: [true, false]}}")), SegmentJobConfig)


def test_k8s_sweep_config_is_a_valid_adapt_sweep():
    # The RayJob reads /config/job.yaml; here the same file from the repository.
    cfg = load_config(SweepConfig, ROOT / "k8s/base/config/sweep.yaml", [f"base={ROOT / 'k8s/base/config/job.yaml'}"])
    assert cfg.job == "adapt" and {"irb.top_fraction", "pseudo.tau", "pseudo.class_balanced"} <= set(cfg.space)
    assert isinstance(check_space(cfg), AdaptJobConfig)


@pytest.mark.slow
def test_two_trial_sweep_nests_runs_and_logs_the_best(ray_session, tmp_path):
    from pipelines.sweep_flow import sweep_and_log

    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = SweepConfig.model_validate(
        {
            "base": TINY_JOB,
            "space": {
                "compute.lr": {"type": "loguniform", "low": 1e-3, "high": 1e-2},
                "augment.hflip": {"type": "choice", "values": [True, False]},
            },
            "num_samples": 2,
            "scheduler": "fifo",  # both trials run every epoch, whatever their scores
            "name": "tiny",
            "runs_dir": str(tmp_path),
            "tracking": {"tracking_uri": tracking_uri},
        }
    )
    result, out_dir = sweep_and_log(cfg)

    assert [t["status"] for t in result.trials] == ["completed", "completed"], result.trials
    client = MlflowClient(tracking_uri)
    summary = yaml.safe_load((out_dir / "summary.json").read_text())
    parent = client.get_run(summary["parent_run_id"])
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 2
    curves = {t["run_id"]: t["curve"] for t in result.trials}
    for child in children:
        assert child.info.status == "FINISHED"
        history = client.get_metric_history(child.info.run_id, "val_mean_dice")
        assert [m.step for m in history] == [1, 2]
        # Tune received every epoch, with the values the job logged.
        assert curves[child.info.run_id] == pytest.approx([m.value for m in history])

    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"best_config.yaml", "sweep.png", "summary.json"} <= artifacts
    assert (out_dir / "sweep.png").stat().st_size > 10_000
    best = load_config(SegmentJobConfig, out_dir / "best_config.yaml")
    assert best.name == "tiny-best" and best.compute.lr == pytest.approx(result.best_params["compute.lr"])
    assert result.best_metric == max(t["val_mean_dice"] for t in result.trials)


def test_a_local_sweep_has_room_for_its_trials_beside_jobs_on_every_core(monkeypatch, tmp_path):
    # Each running trial holds TRIAL_CPUS while its Train run's workers take theirs: a 2-worker job on a 2-core
    # machine timed out waiting for its workers when local Ray counted only the cores.
    import contextlib
    import os

    from pipelines import sweep_flow
    from training.tune import TRIAL_CPUS

    asked = {}

    @contextlib.contextmanager
    def fake_local_ray(num_cpus=None, address=None):
        asked["num_cpus"] = num_cpus
        raise RuntimeError("stop before Ray")
        yield

    monkeypatch.setattr(sweep_flow, "local_ray", fake_local_ray)
    cfg = SweepConfig.model_validate(
        {
            "base": TINY_JOB,
            "space": {"compute.lr": {"type": "choice", "values": [1e-3]}},
            "max_concurrent_trials": 3,
            "runs_dir": str(tmp_path),
            "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        }
    )
    with pytest.raises(RuntimeError, match="stop before Ray"):
        sweep_flow.sweep_and_log(cfg)
    assert asked["num_cpus"] >= os.cpu_count() + 3 * TRIAL_CPUS


def test_trials_get_absolute_paths_for_what_exists_from_the_launch_folder(monkeypatch, tmp_path):
    # Tune runs each trial in its own folder: the adapt job resolves its data, teacher and translator paths when its
    # config is read, in the folder the sweep was launched from.
    (tmp_path / "data" / "frames").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(
        AdaptJobConfig,
        None,
        [
            "target={kind: folder, uri: data/frames, labelled: false}",
            "teacher_checkpoint=runs/ray/teacher",
            "style={method: translator, translator: runs/gen.pt}",
            "irb.enabled=false",
        ],
    )
    assert cfg.target.uri == str(tmp_path / "data" / "frames")
    assert cfg.teacher_checkpoint == str(tmp_path / "runs/ray/teacher")
    assert cfg.style.translator == str(tmp_path / "runs/gen.pt")
    s3 = load_config(AdaptJobConfig, None, ["teacher_checkpoint=s3://bucket/teacher"])
    assert s3.teacher_checkpoint == "s3://bucket/teacher"  # left for the job to read
