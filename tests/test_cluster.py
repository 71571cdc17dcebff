"""What `make train-cluster` and `make sweep` submit, and K8S=1 without a cluster (no Ray started here).

The local 2-node cluster itself, the Jobs-API submission and a node failure are exercised by
tests/test_fault_tolerance.py.
"""

from __future__ import annotations

import shlex
import shutil

import pytest

from pipelines import cluster
from training.config import load_config
from training.segment.config import SegmentJobConfig
from training.tune import SweepConfig, check_space


def parse(entrypoint: str) -> tuple[list[str], str, list[str]]:
    words = shlex.split(entrypoint)
    sets = [words[i + 1] for i, word in enumerate(words) if word == "--set"]
    return words, words[words.index("-c") + 1], sets


def test_train_entrypoint_is_the_k8s_job_shrunk(tmp_path) -> None:
    words, config, sets = parse(cluster.train_entrypoint(str(tmp_path), ["compute.epochs=1"]))
    assert words[:5] == ["python", "-m", "pipelines.cli", "segment", "train"]
    assert config == "k8s/base/config/job.yaml"  # relative: resolved in the uploaded working dir
    job = load_config(SegmentJobConfig, cluster.ROOT / config, sets)
    assert job.runs_dir == str(tmp_path)
    assert job.compute.epochs == 1  # the caller's override comes last and wins
    assert job.source.count == 64 and job.source.size == 64
    assert words[-2:] == ["--register", "endoflow-segmenter@champion"]


def test_sweep_entrypoint_inlines_a_small_base(tmp_path) -> None:
    words, config, sets = parse(cluster.sweep_entrypoint(str(tmp_path), []))
    assert words[3] == "sweep"
    sweep = load_config(SweepConfig, cluster.ROOT / config, sets)
    assert sweep.num_samples == 2 and sweep.runs_dir == str(tmp_path)
    base = check_space(sweep)  # every bound of the k8s sweep's space fits the shrunk base
    assert base.compute.epochs == 3 and base.source.size == 64


def test_runtime_env_uploads_code_not_outputs(monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    env = cluster.runtime_env()
    assert env["working_dir"] == str(cluster.ROOT)
    assert {".venv", "runs", ".git", "*.onnx"} <= set(env["excludes"])
    assert env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow.example:5000"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_k8s_without_a_cluster_says_so(tmp_path, monkeypatch, capsys) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\nclusters: [{name: none, cluster: {server: 'https://127.0.0.1:9'}}]\n"
        "contexts: [{name: none, context: {cluster: none}}]\ncurrent-context: none\n"
    )
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    assert cluster.main(["train", "--k8s"]) == 2
    assert "reaches no Kubernetes cluster" in capsys.readouterr().err
