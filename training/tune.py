"""Hyper-parameter sweeps with Ray Tune: each trial is one whole Ray Train job, logged as a nested MLflow run.

A trial is a Tune *function trainable* that drives a job (the pattern Ray 2.60 supports for Train V2 inside Tune):
it builds the job config from the sweep's base plus its sampled `dotted.key` values (the same override path as
`--set`, so a bad value fails with the field named), opens an MLflow run nested under the sweep's parent run, and
runs the job. The job's train loop reports every epoch to Ray Train; `TuneEpochReport` hands each of those reports
to Tune, so schedulers see per-epoch metrics and can stop a trial between epochs.

Resources: the trial itself only waits on its Train run, so it reserves a token CPU share; its Train workers take
theirs. `max_concurrent_trials` is what bounds the load (1 by default: on a 2-core machine one job fills it).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import mlflow
import yaml
from mlflow.tracking import MlflowClient
from pydantic import BaseModel, Field, field_validator, model_validator
from ray import tune
from ray.train.v2._internal.constants import RAY_TRAIN_CALLBACKS_ENV_VAR
from ray.train.v2._internal.execution.callback import ReportCallback
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.search.sample import Domain

from training import tracking
from training.adapt import train as adapt_train
from training.adapt.config import AdaptJobConfig
from training.config import ConfigError, StrictModel, load_config, to_yaml
from training.patient import train as patient_train
from training.patient.config import PatientJobConfig
from training.segment import train as segment_train
from training.segment.config import SegmentJobConfig
from training.tracking import TrackingConfig

TRIAL_CPUS = 0.01  # a trial only waits on its Train run; Tune refuses a zero-resource trial


@dataclass(frozen=True)
class Job:
    config: type[BaseModel]
    run: Callable[[Any, str], Any]  # run(cfg, tracking_uri): one Ray Train job on the connected cluster


# The jobs a sweep can drive; a new job is one line here.
JOBS: dict[str, Job] = {
    "segment": Job(SegmentJobConfig, segment_train.run),
    "adapt": Job(AdaptJobConfig, adapt_train.run),
    "patient": Job(PatientJobConfig, patient_train.run),  # every trial propagates again: seconds, then fine-tunes
}


class ParamSpec(StrictModel):
    """One searched config field: `choice` of `values`, or a number in [low, high] (`randint`: high excluded)."""

    type: Literal["choice", "uniform", "loguniform", "randint"]
    values: list[Any] | None = None
    low: float | None = None
    high: float | None = None

    @model_validator(mode="after")
    def _complete(self) -> ParamSpec:
        if self.type == "choice":
            if not self.values or self.low is not None or self.high is not None:
                raise ValueError("choice takes a non-empty 'values' list and no low/high")
            return self
        if self.values is not None or self.low is None or self.high is None:
            raise ValueError(f"{self.type} takes 'low' and 'high', not 'values'")
        if not self.low < self.high:
            raise ValueError(f"{self.type} needs low < high, got [{self.low}, {self.high}]")
        if self.type == "loguniform" and self.low <= 0:
            raise ValueError(f"loguniform needs low > 0, got {self.low}")
        if self.type == "randint" and not (self.low.is_integer() and self.high.is_integer()):
            raise ValueError(f"randint needs integer bounds, got [{self.low}, {self.high}]")
        return self

    def sampler(self) -> Domain:
        if self.type == "choice":
            return tune.choice(self.values)
        if self.type == "randint":
            return tune.randint(int(self.low), int(self.high))
        return getattr(tune, self.type)(self.low, self.high)

    def extremes(self) -> list[Any]:
        """The values checked against the job config before any trial starts."""
        if self.type == "choice":
            return list(self.values)
        if self.type == "randint":
            return [int(self.low), int(self.high) - 1]
        return [self.low, self.high]


class SweepConfig(StrictModel):
    job: str = Field("segment", description=f"the job every trial runs: {', '.join(JOBS)}")
    base: dict[str, Any] | str = Field(
        default_factory=dict, description="the job config trials start from: a mapping, or the path of its YAML"
    )
    space: dict[str, ParamSpec] = Field(description="dotted job-config key → how to sample it")
    metric: str = Field("val_mean_dice", description="reported by the job every epoch")
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(8, ge=1, description="trials")
    scheduler: Literal["asha", "fifo"] = Field(
        "asha",
        description="asha: every epoch reports the metric, so a trial trailing its peers at a rung (grace_period "
        "epochs, then ×reduction_factor, up to max_t = compute.epochs) is stopped there and its CPUs go to the next "
        "trial; successive halving pays for more samples in the same budget. fifo: every trial runs to the end.",
    )
    grace_period: int | None = Field(
        None, ge=1, description="epochs before asha may stop a trial; None: 1, or the first adaptation epoch (adapt)"
    )
    reduction_factor: float = Field(2.0, gt=1.0, description="asha keeps the best 1/reduction_factor at each rung")
    max_concurrent_trials: int = Field(1, ge=1, description="each trial is itself a multi-worker Ray Train run")
    seed: int | None = Field(0, description="of the random search (None: a different sweep each time)")
    name: str = Field("sweep", description="Tune experiment name; trial jobs are named <name>-<trial id>")
    runs_dir: str = Field("runs", description="Tune and Ray Train storage, MLflow store; overrides the base's")
    tracking: TrackingConfig = TrackingConfig()

    @field_validator("job")
    @classmethod
    def _known_job(cls, job: str) -> str:
        if job not in JOBS:
            raise ValueError(f"job {job!r} is not one of: {', '.join(JOBS)}")
        return job

    @model_validator(mode="after")
    def _epochs_fixed_under_asha(self) -> SweepConfig:
        if self.scheduler == "asha" and "compute.epochs" in self.space:
            raise ValueError("asha's max_t is the base's compute.epochs: sweep compute.epochs with scheduler fifo")
        return self


@dataclass
class SweepResult:
    best_config: dict[str, Any]  # the best trial's full job config, ready for `endoflow segment train -c` (or adapt)
    best_metric: float
    trials: list[dict[str, Any]]  # trial_id, run_id, params, status, epochs, <metric> (last), curve, error
    best_params: dict[str, Any] = field(default_factory=dict)  # the searched values of the best trial


def build_search_space(space: dict[str, ParamSpec | dict[str, Any]]) -> dict[str, Domain]:
    """`{dotted.key: spec}` → Tune samplers under the same keys; a malformed spec fails with its key named."""
    samplers = {}
    for key, spec in space.items():
        try:
            samplers[key] = (spec if isinstance(spec, ParamSpec) else ParamSpec.model_validate(spec)).sampler()
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            raise ConfigError(f"space.{key}: {exc}") from exc
    return samplers


def trial_config(job: str, base: dict[str, Any], sampled: dict[str, Any]) -> BaseModel:
    """`base` (a job config as a mapping) with `sampled` dotted values applied, validated like `--set` overrides."""
    overrides = [f"{key}={_yaml(value)}" for key, value in [*_leaves(base), *sampled.items()]]
    return load_config(JOBS[job].config, None, overrides)


def check_space(cfg: SweepConfig) -> BaseModel:
    """The validated base job config, after every bound and choice of the space passed through it on its own:
    an unknown key or an out-of-range bound fails here, named, before Ray starts a trial."""
    if isinstance(cfg.base, str):
        base = load_config(JOBS[cfg.job].config, cfg.base)
    else:
        base = trial_config(cfg.job, cfg.base, {})
    base_tree = base.model_dump(mode="json")
    for key, spec in cfg.space.items():
        for value in spec.extremes():
            try:
                trial_config(cfg.job, base_tree, {key: value})
            except ConfigError as exc:
                raise ConfigError(f"space.{key} = {value!r}: {exc}") from exc
    if cfg.metric.startswith("val_") and getattr(base, "val", None) is None:
        raise ConfigError(f"metric {cfg.metric!r} is scored on validation frames: the base config needs 'val'")
    return base


def run_sweep(cfg: SweepConfig, tracking_uri: str, parent_run_id: str | None = None) -> SweepResult:
    """Run the sweep on the connected Ray cluster. Trials nest under `parent_run_id` (default: the active run)."""
    parent_run_id = parent_run_id or _active_run_id()
    base = check_space(cfg)
    epochs = base.compute.epochs
    # What the trials run: the validated base with the sweep's storage and tracking (best_config.yaml is one too).
    job_tree = base.model_dump(mode="json") | {"runs_dir": cfg.runs_dir, "tracking": cfg.tracking.model_dump()}
    trial_tree = job_tree | {  # data uris and checkpoints are absolute already: the job configs resolve them
        "runs_dir": cfg.runs_dir if "://" in cfg.runs_dir else str(Path(cfg.runs_dir).resolve()),  # trials chdir
        "tracking": job_tree["tracking"] | {"tracking_uri": tracking_uri},
    }
    client = MlflowClient(tracking_uri)
    trainable = tune.with_parameters(
        _trial,
        job=cfg.job,
        base=trial_tree,
        name=cfg.name,
        tracking_uri=tracking_uri,
        parent_run_id=parent_run_id,
        experiment_id=client.get_run(parent_run_id).info.experiment_id,
    )
    if cfg.scheduler == "asha":
        # Adapt's first epochs train the same source-only teacher in every trial: nothing to rank there yet.
        grace = cfg.grace_period or getattr(base, "teacher_phase", 0) + 1
        # Tune stops a trial by ending its process, and the Train run dies with it before releasing its workers'
        # resources (Ray's PlacementGroupCleaner reclaims them). stop_last_trials=False lets a surviving trial end
        # on its own after its last epoch, so only trials ASHA really cuts short take that path.
        scheduler = ASHAScheduler(
            max_t=epochs, grace_period=grace, reduction_factor=cfg.reduction_factor, stop_last_trials=False
        )
    else:
        scheduler = FIFOScheduler()
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": TRIAL_CPUS}),
        param_space=build_search_space(cfg.space),
        tune_config=tune.TuneConfig(
            metric=cfg.metric,
            mode=cfg.mode,
            num_samples=cfg.num_samples,
            scheduler=scheduler,
            # Tune ignores max_concurrent_trials when given a search algorithm: the limit goes on it instead.
            search_alg=BasicVariantGenerator(max_concurrent=cfg.max_concurrent_trials, random_state=cfg.seed),
            trial_dirname_creator=lambda trial: trial.trial_id,
        ),
        run_config=tune.RunConfig(name=cfg.name, storage_path=f"{trial_tree['runs_dir']}/sweep", verbose=1),
    )
    grid = tuner.fit()

    children = client.search_runs(
        [client.get_run(parent_run_id).info.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'"
    )
    runs = {run.data.tags.get("endoflow.trial_id"): run for run in children}
    trials = []
    for result in grid:
        history = result.metrics_dataframe
        curve = [] if history is None or cfg.metric not in history else history[cfg.metric].tolist()
        trial_id = Path(result.path).name
        status = "error" if result.error else ("completed" if len(curve) >= epochs else "stopped")
        run = runs.get(trial_id)
        if run is not None and run.info.status == "RUNNING":
            # Tune stopped the trial by ending its process mid-job, so the nested run could not close itself.
            client.set_tag(run.info.run_id, "endoflow.stopped_by_tune_after_epoch", len(curve))
            client.set_terminated(run.info.run_id, "KILLED")
        trials.append(
            {
                "trial_id": trial_id,
                "run_id": None if run is None else run.info.run_id,
                "params": {key: result.config[key] for key in cfg.space},
                "status": status,
                "epochs": len(curve),
                cfg.metric: curve[-1] if curve else None,
                "curve": curve,
                "error": None if result.error is None else str(result.error).splitlines()[0],
            }
        )
    scored = [t for t in trials if t[cfg.metric] is not None and not math.isnan(t[cfg.metric])]
    if not scored:
        raise RuntimeError(
            f"no trial of sweep {cfg.name} reported {cfg.metric}: {trials[0]['error'] if trials else ''}"
        )
    best = (max if cfg.mode == "max" else min)(scored, key=lambda t: t[cfg.metric])
    best_config = trial_config(cfg.job, job_tree, best["params"] | {"name": f"{cfg.name}-best"})
    return SweepResult(best_config.model_dump(mode="json"), best[cfg.metric], trials, best["params"])


class TuneEpochReport(ReportCallback):
    """Hands every report of a Train run to the Tune trial that started it (rank 0's metrics, checkpoint path).

    Ray's `TuneReportCallback` does this when given to the trainer's RunConfig; the jobs build their trainer in
    `training.loop.fit`, so it comes in instead through Train's RAY_TRAIN_CALLBACKS hook, set in the trial's
    process only. Its queue holds one report, so a Train run is never more than an epoch ahead of Tune.
    """

    def __init__(self) -> None:
        self.tune = TuneReportCallback()  # binds to the Tune session of the process building the trainer

    def after_report(self, training_report: Any, metrics: list[dict[str, Any]]) -> None:
        self.tune.after_report(None, metrics, training_report.checkpoint)


def _trial(
    sampled: dict[str, Any],
    job: str,
    base: dict[str, Any],
    name: str,
    tracking_uri: str,
    parent_run_id: str,
    experiment_id: str,
) -> None:
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(job, base, sampled | {"name": f"{name}-{trial_id}"})  # a fresh Train run per trial
    mlflow.set_tracking_uri(tracking_uri)
    # An explicit parent: this process has no active run, so `nested=True` alone would start a top-level run.
    with mlflow.start_run(
        run_name=cfg.name,
        experiment_id=experiment_id,
        parent_run_id=parent_run_id,
        tags={"endoflow.trial_id": trial_id},
    ) as run:
        cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"run_id": run.info.run_id})})
        tracking.log_config(cfg)
        mlflow.log_text(to_yaml(cfg), "config.yaml")
        with _reports_to_tune():
            JOBS[job].run(cfg, tracking_uri)


@contextlib.contextmanager
def _reports_to_tune() -> Iterator[None]:
    os.environ[RAY_TRAIN_CALLBACKS_ENV_VAR] = f"{__name__}.{TuneEpochReport.__name__}"
    try:
        yield
    finally:
        os.environ.pop(RAY_TRAIN_CALLBACKS_ENV_VAR, None)


def _active_run_id() -> str:
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("run_sweep needs the sweep's parent MLflow run: start one or pass parent_run_id")
    return run.info.run_id


def _leaves(tree: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    leaves = []
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            leaves += _leaves(value, f"{prefix}{key}.")
        else:
            leaves.append((f"{prefix}{key}", value))
    return leaves


def _yaml(value: Any) -> str:
    """A value as override text that YAML reads back unchanged (`5e-05` alone would read back as a string)."""
    return yaml.safe_dump(value, default_flow_style=True, width=math.inf).removesuffix("...\n").strip()
