"""A hyper-parameter sweep end to end: parent MLflow run → Ray Tune trials (nested runs) → best config, plot, summary.

Used by `endoflow sweep`; the Tune plumbing lives in `training/tune.py`. Everything lands in
`<runs_dir>/sweep/<name>/` (beside Tune's own trial folders) and on the parent run as artifacts.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import mlflow
import yaml

from pipelines.local_ray import local_ray
from training import tracking
from training.tune import TRIAL_CPUS, SweepConfig, SweepResult, check_space, run_sweep


def sweep_and_log(cfg: SweepConfig, address: str | None = None) -> tuple[SweepResult, Path]:
    """Run the sweep (local Ray, or the cluster at `address`/$RAY_ADDRESS); returns the result and its folder."""
    check_space(cfg)  # a bad space or base fails here, before Ray starts
    out_dir = Path(cfg.runs_dir) / "sweep" / cfg.name
    tracking_uri = tracking.use_tracking(cfg.tracking, cfg.runs_dir)
    # One logical CPU more than the cores for a local Ray: every running trial holds a token CPU share (TRIAL_CPUS)
    # while it waits on its Train run, and without the spare a job whose workers take every core never starts.
    spare = math.ceil(TRIAL_CPUS * cfg.max_concurrent_trials)
    with (
        local_ray(num_cpus=(os.cpu_count() or 1) + spare, address=address),
        mlflow.start_run(run_name=cfg.name, tags={"endoflow.sweep": cfg.job}) as parent,
    ):
        tracking.log_config(cfg, "sweep.json")
        result = run_sweep(cfg, tracking_uri, parent.info.run_id)

        out_dir.mkdir(parents=True, exist_ok=True)
        best = out_dir / "best_config.yaml"
        best.write_text(yaml.safe_dump(result.best_config, sort_keys=False))
        summary = out_dir / "summary.json"
        summary.write_text(
            json.dumps(
                {
                    "name": cfg.name,
                    "job": cfg.job,
                    "metric": cfg.metric,
                    "mode": cfg.mode,
                    "scheduler": cfg.scheduler,
                    "parent_run_id": parent.info.run_id,
                    "best_metric": result.best_metric,
                    "best_params": result.best_params,
                    "best_config": result.best_config,
                    "trials": result.trials,
                },
                indent=2,
            )
        )
        for path in (best, summary, plot_sweep(result, cfg, out_dir / "sweep.png")):
            mlflow.log_artifact(str(path))
        mlflow.log_metric(f"best_{cfg.metric}", result.best_metric)
        mlflow.log_metrics(
            {"trials_completed": _count(result, "completed"), "trials_stopped": _count(result, "stopped")}
        )
    return result, out_dir


def plot_sweep(result: SweepResult, cfg: SweepConfig, path: Path) -> Path:
    """One panel per searched key (the trial's last metric against its value), and the per-epoch curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [t for t in result.trials if t[cfg.metric] is not None]
    figure, axes = plt.subplots(1, len(cfg.space) + 1, figsize=(4 * (len(cfg.space) + 1), 3.6), dpi=100)
    for axis, (key, spec) in zip(axes[:-1], cfg.space.items(), strict=True):
        values = [t["params"][key] for t in scored]
        if spec.type == "choice":  # categories at 0, 1, 2…, labelled
            axis.set_xticks(range(len(spec.values)), [str(v) for v in spec.values])
            values = [spec.values.index(v) for v in values]
        elif spec.type == "loguniform":
            axis.set_xscale("log")
        for status, marker in (("completed", "o"), ("stopped", "x")):
            points = [(v, t[cfg.metric]) for v, t in zip(values, scored, strict=True) if t["status"] == status]
            if points:
                axis.scatter(*zip(*points, strict=True), marker=marker, label=status)
        axis.set(xlabel=key, ylabel=cfg.metric)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)

    curves = axes[-1]
    for trial in result.trials:
        best = trial["params"] == result.best_params
        style = "-" if trial["status"] == "completed" else "--"
        epochs = range(1, len(trial["curve"]) + 1)
        curves.plot(epochs, trial["curve"], style, marker=".", linewidth=2.5 if best else 1, label=trial["trial_id"])
    curves.set(title="per epoch (dashed: stopped)", xlabel="epoch", ylabel=cfg.metric)
    curves.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    curves.grid(alpha=0.3)
    curves.legend(fontsize=7)
    figure.suptitle(f"sweep {cfg.name}: best {cfg.metric} {result.best_metric:.4f}")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


def _count(result: SweepResult, status: str) -> int:
    return sum(t["status"] == status for t in result.trials)
