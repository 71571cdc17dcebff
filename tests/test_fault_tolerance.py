"""A node dies mid-training: Ray Train restarts the workers from the last checkpoint and the job still finishes.

A private 2-node cluster (pipelines/cluster.py: `ray start` processes, not this process's Ray, so it runs beside
the session's `ray_session`) gets `endoflow segment train` through the Jobs API. Each node has one CPU, so the two Train
workers sit on different nodes. Once the first checkpoint lands, the worker node is SIGKILLed (its raylet and
its Train worker: a lost machine) and a replacement node joins, as KubeRay would start a new pod.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from pipelines.cluster import LocalCluster, NodeSpec, jobs_client, processes_under, wait_for_job

EPOCHS = 5
# Node failures are noticed after period × threshold; Ray's defaults take ~15 s.
FAST_HEALTH_CHECKS = {"RAY_health_check_period_ms": "500", "RAY_health_check_failure_threshold": "4"}


def registered_checkpoints(run_dir: Path) -> int:
    """Checkpoints Ray Train's controller has registered, from the snapshot it writes after each one. A
    `checkpoint_*` directory alone is not enough: it exists while the upload is still running, and a node killed
    then restarts the run from epoch 0 (seen on a slow machine)."""
    try:
        return len(json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())["checkpoint_results"])
    except (OSError, ValueError, KeyError):  # not written yet, or caught mid-write
        return 0


@pytest.mark.slow
def test_training_survives_a_lost_node(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    runs = tmp_path / "runs"
    job = {
        "name": "ft",
        "runs_dir": str(runs),
        "source": {"kind": "sim", "style": "sim", "count": 48, "size": 96, "seed": 0},
        "model": {"base_width": 4, "depth": 2},
        "augment": {"hflip": False},
        "compute": {"epochs": EPOCHS, "workers": 2, "batch_size": 4, "cpus_per_worker": 1, "max_failures": 2},
    }
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(job))
    checkpoints = runs / "ray" / "ft"

    cluster = LocalCluster([NodeSpec(1), NodeSpec(1, {"worker_node": 1})], env=FAST_HEALTH_CHECKS)
    with cluster:
        client = jobs_client(cluster.dashboard_url, cluster.token)
        job_id = client.submit_job(
            entrypoint=f"python -m pipelines.cli segment train -c {config}",
            runtime_env={"env_vars": {"MLFLOW_TRACKING_URI": f"sqlite:///{runs}/mlflow.db"}},
        )
        deadline = time.monotonic() + 240
        while not registered_checkpoints(checkpoints):  # the first epoch is checkpointed and Ray Train knows it
            assert client.get_job_status(job_id).is_terminal() is False, client.get_job_logs(job_id)[-3000:]
            assert time.monotonic() < deadline, "no checkpoint registered"
            time.sleep(0.2)
        cluster.kill_node(1)
        cluster.add_node(NodeSpec(1, {"worker_node": 1}))
        status = wait_for_job(client, job_id, stream=False)
        logs = client.get_job_logs(job_id)
    assert not processes_under(cluster.temp_dir), "ray processes left behind"
    assert not cluster.temp_dir.exists()
    assert status == "SUCCEEDED", logs[-4000:]

    runs_client = MlflowClient(f"sqlite:///{runs}/mlflow.db")
    run = runs_client.search_runs([runs_client.get_experiment_by_name("endoflow").experiment_id])[0]
    resumed = runs_client.get_metric_history(run.info.run_id, "resumed_after_epoch")
    restart_epoch = int(max(m.value for m in resumed))
    # The restart continued from a checkpoint, not from epoch 0, and before the end.
    assert 1 <= restart_epoch < EPOCHS, [(m.step, m.value) for m in resumed]
    assert f"resuming after epoch {restart_epoch}" in logs
    # Every epoch was trained and logged; the ones after the restart come from the resumed workers.
    epochs = {int(m.value) for m in runs_client.get_metric_history(run.info.run_id, "epoch")}
    assert epochs == set(range(1, EPOCHS + 1))
    assert {m.step for m in resumed if m.value == restart_epoch} == set(range(restart_epoch + 1, EPOCHS + 1))
    assert f"epoch {EPOCHS}/{EPOCHS}" in logs
