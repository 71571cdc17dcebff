"""A Ray cluster for jobs: a private local multi-node one, or the one at $RAY_ADDRESS, fed through the Jobs API.

`make train-cluster` and `make sweep` come here; so do the fault-tolerance tests, which kill a node mid-run.

Local cluster: one `ray start --head` and N `ray start --address` nodes, each with its own CPUs and resources, in a
private temp dir, with one fresh auth token (Ray 2.60 turns token auth on; RAY_AUTH_TOKEN in the environment is the
in-memory way to hand it to every process, so nothing is written to $HOME). Every node runs `ray start --block` in a
session of its own: it owns its raylet and workers, so stopping (or killing, to simulate a failure) one node is
signalling its process group. `ray stop` is never used: it would stop every Ray on the machine.

Submission: the Jobs SDK (what `ray job submit` wraps) uploads the repository as the working dir (minus the
excludes below), runs the entrypoint on the cluster, streams its logs here and returns its final status.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.local_ray import exit_on_sigterm, free_port

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
# Never uploaded with the working dir: environments, outputs, caches, models, tests.
EXCLUDES = [".git", ".venv", "venv", "runs", "mlruns", "**/__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis"]
EXCLUDES += ["tests"]
EXCLUDES += ["*.onnx", "*.onnx.data", "*.pt", "*.ckpt", "*.egg-info", "build", "dist"]
# Passed on to the job when set here: where MLflow and S3 are.
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID")
FORWARDED_ENV += ("AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
K8S_CONFIG = "k8s/base/config"
# The k8s job config, shrunk so a 2-core laptop finishes it in a few minutes (same code path, less data).
QUICK_JOB = [
    "compute.epochs=2",
    "compute.workers=2",
    "source.count=64",
    "source.size=64",
    "target.count=32",
    "target.size=64",
    "val.count=16",
    "val.size=64",
    "model.base_width=8",
    "model.depth=3",
]


class NodeStartError(RuntimeError):
    pass


@dataclass
class NodeSpec:
    num_cpus: int = 1
    resources: dict[str, float] = field(default_factory=dict)


@dataclass
class _Node:
    spec: NodeSpec
    process: subprocess.Popen
    log: Path


class LocalCluster:
    """Head + worker nodes on this machine. Use as a context manager: the cluster is stopped on exit, always."""

    def __init__(self, nodes: list[NodeSpec] | None = None, env: dict[str, str] | None = None):
        self.specs = nodes or [NodeSpec(1), NodeSpec(1, {"worker_node": 1})]
        self.token = secrets.token_hex(32)
        self.temp_dir = Path(tempfile.mkdtemp(prefix="efcl-", dir="/tmp"))  # short: unix socket paths ≤ 107 bytes
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.nodes: list[_Node] = []
        self.env = {
            **os.environ,
            **(env or {}),
            "RAY_AUTH_TOKEN": self.token,
            "RAY_AUTH_MODE": "token",
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # the job's `python` is this venv's
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        self.env.pop("RAY_AUTH_TOKEN_PATH", None)
        self.env.pop("RAY_ADDRESS", None)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def __enter__(self) -> LocalCluster:
        self._restore_sigterm = exit_on_sigterm()  # a killed `make train-cluster` still stops its nodes
        try:
            for spec in self.specs:
                self.add_node(spec)
        except BaseException:
            self.stop()
            self._restore_sigterm()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            self._restore_sigterm()

    def add_node(self, spec: NodeSpec, timeout_s: float = 120, attempts: int = 2) -> int:
        """Start a node (the head if it is the first) and wait until the cluster counts it; returns its index.

        `ray start` gives a raylet 30 s (hard-coded) to register; on an overloaded machine it can miss that and
        exit, so a node that dies while starting is cleaned up and started again, up to `attempts` times.
        """
        for attempt in range(1, attempts + 1):
            self._spawn_node(spec)
            try:
                self._wait_for_nodes(timeout_s)
                return len(self.nodes) - 1
            except NodeStartError as error:
                failed = self.nodes.pop()
                _signal_group(failed.process, signal.SIGKILL)
                if attempt == attempts:
                    raise RuntimeError(str(error)) from None
                print(f"[cluster] node failed to start (attempt {attempt}/{attempts}); retrying", flush=True)
        raise AssertionError("unreachable")

    def _spawn_node(self, spec: NodeSpec) -> None:
        head = not self.nodes
        command = [str(VENV_BIN / "ray"), "start", "--block", "--disable-usage-stats", "--node-ip-address=127.0.0.1"]
        command += [f"--num-cpus={spec.num_cpus}", f"--resources={json.dumps(spec.resources)}"]
        # Every node on one host needs ports of its own (the defaults would collide with other Rays here).
        ports = ["dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port"]
        ports += ["runtime-env-agent-port", "node-manager-port", "object-manager-port"]
        command += [f"--{name}={free_port()}" for name in ports]
        if head:
            command += ["--head", f"--port={self.gcs_port}", f"--temp-dir={self.temp_dir}", "--include-dashboard=true"]
            command += ["--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}"]
            command += [f"--ray-client-server-port={free_port()}"]
        else:  # a private temp dir per node too: the default /tmp/ray is shared with every other Ray here
            node_dir = self.temp_dir / f"n{len(self.nodes)}-{secrets.token_hex(2)}"
            command += [f"--address={self.address}", f"--temp-dir={node_dir}"]
        log = self.temp_dir / f"node-{len(self.nodes)}-{secrets.token_hex(2)}.log"
        with open(log, "w") as stream:
            process = subprocess.Popen(
                command, env=self.env, stdout=stream, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.nodes.append(_Node(spec, process, log))

    def kill_node(self, index: int) -> None:
        """SIGKILL a node's whole process group: what a crashed machine or an evicted pod looks like to Ray."""
        _signal_group(self.nodes[index].process, signal.SIGKILL)
        self.nodes[index].process.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM every node (graceful), SIGKILL what is left after 5 s, then remove the temp dir."""
        for node in reversed(self.nodes):
            _signal_group(node.process, signal.SIGTERM)
        deadline = time.monotonic() + 5  # a graceful Ray shutdown can take a minute on a busy machine
        for node in reversed(self.nodes):
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            _signal_group(node.process, signal.SIGKILL)  # stragglers of the group, even if the leader exited
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.process.wait(timeout=10)
        for pid in processes_under(self.temp_dir):  # anything of ours that left its group (only ever our session dir)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def alive_nodes(self) -> int:
        return sum(1 for node in self._state_nodes() if node.get("state") == "ALIVE")

    def _state_nodes(self) -> list[dict[str, Any]]:
        import urllib.request

        request = urllib.request.Request(
            f"{self.dashboard_url}/api/v0/nodes?limit=1000", headers={"Authorization": f"Bearer {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=5) as reply:
            return json.load(reply)["data"]["result"]["result"]

    def _wait_for_nodes(self, timeout_s: float) -> None:
        started, expected = time.monotonic(), sum(1 for node in self.nodes if node.process.poll() is None)
        newest = self.nodes[-1]
        while True:
            if newest.process.poll() is not None:
                raise NodeStartError(f"ray node {len(self.nodes) - 1} exited at start:\n{_tail(newest.log)}")
            with contextlib.suppress(OSError, ValueError):
                if self.alive_nodes() >= expected:
                    return
            if time.monotonic() - started > timeout_s:
                raise TimeoutError(f"ray cluster not up after {timeout_s:.0f}s:\n{_tail(newest.log)}")
            time.sleep(0.5)


def _signal_group(process: subprocess.Popen, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)  # start_new_session: the group id is the leader's pid


def processes_under(temp_dir: Path) -> list[int]:
    """Pids whose command line names `temp_dir` (Ray passes its session dir to every process it starts)."""
    found, needle = [], str(temp_dir).encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if needle in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
    return found


def _tail(path: Path, lines: int = 30) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


# --- the Jobs API --------------------------------------------------------------------------------------------


def runtime_env(extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    env_vars = {key: os.environ[key] for key in FORWARDED_ENV if os.environ.get(key)} | (extra_env or {})
    return {"working_dir": str(ROOT), "excludes": EXCLUDES, "env_vars": env_vars}


def submit(
    dashboard_url: str,
    entrypoint: str,
    token: str | None = None,
    extra_env: dict[str, str] | None = None,
    follow: bool = True,
    entrypoint_num_cpus: float = 0,
) -> str:
    """Submit `entrypoint` with the repository as its working dir; with `follow`, stream logs until it ends.

    Returns the job's final status (SUCCEEDED, FAILED, STOPPED) when following, else its submission id.
    """
    client = jobs_client(dashboard_url, token)
    job_id = client.submit_job(
        entrypoint=entrypoint, runtime_env=runtime_env(extra_env), entrypoint_num_cpus=entrypoint_num_cpus
    )
    print(f"[cluster] submitted {job_id} to {dashboard_url}: {entrypoint}", flush=True)
    if not follow:
        return job_id
    return wait_for_job(client, job_id)


def wait_for_job(client: Any, job_id: str, stream: bool = True) -> str:
    """Poll until the job ends, printing new log output as it comes (Ctrl-C interrupts at once)."""
    from ray.job_submission import JobStatus

    shown = 0
    while True:
        status = client.get_job_status(job_id)
        if stream:
            logs = client.get_job_logs(job_id)
            print(logs[shown:], end="", flush=True)
            shown = len(logs)
        if status in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
            break
        time.sleep(2)
    info = client.get_job_info(job_id)
    print(f"[cluster] job {job_id}: {status.value}{f' ({info.message})' if info.message else ''}", flush=True)
    return status.value


def jobs_client(dashboard_url: str, token: str | None = None) -> Any:
    """A Jobs-API client sending `token` (default: $RAY_AUTH_TOKEN) itself: Ray's own token loader is a
    process-wide singleton that keeps the first token it saw, which is not this cluster's in a test session."""
    from ray.job_submission import JobSubmissionClient

    token = token or os.environ.get("RAY_AUTH_TOKEN")
    return JobSubmissionClient(dashboard_url, headers={"Authorization": f"Bearer {token}"} if token else None)


def run_job(entrypoint: str, nodes: list[NodeSpec] | None = None, extra_env: dict[str, str] | None = None) -> str:
    """On $RAY_ADDRESS (the dashboard URL, e.g. http://127.0.0.1:8265) when set, else on a fresh local cluster."""
    address = os.environ.get("RAY_ADDRESS")
    if address:
        url = address if "://" in address else f"http://{address}"
        return submit(url, entrypoint, extra_env=extra_env)
    with LocalCluster(nodes) as cluster:
        print(f"[cluster] local cluster: {len(cluster.nodes)} nodes, dashboard {cluster.dashboard_url}", flush=True)
        return submit(cluster.dashboard_url, entrypoint, cluster.token, extra_env)


# --- what `make train-cluster` and `make sweep` run -----------------------------------------------------------


def train_entrypoint(runs_dir: str, overrides: list[str]) -> str:
    sets = [f"runs_dir={runs_dir}", *QUICK_JOB, *overrides]
    words = ["python", "-m", "pipelines.cli", "segment", "train", "-c", f"{K8S_CONFIG}/job.yaml"]
    words += [part for value in sets for part in ("--set", value)]
    return shlex.join([*words, "--register", "endoflow-segmenter@champion"])


def sweep_entrypoint(runs_dir: str, overrides: list[str]) -> str:
    """The k8s sweep over a shrunk copy of the k8s job: `base` goes inline (JSON is YAML) so no file must exist."""
    import yaml

    from training.config import apply_override

    base = yaml.safe_load((ROOT / K8S_CONFIG / "job.yaml").read_text())
    for override in [*QUICK_JOB, "compute.epochs=3"]:
        apply_override(base, override)
    sets = [f"base={json.dumps(base)}", f"runs_dir={runs_dir}", "num_samples=2", "max_concurrent_trials=1"]
    sets += ["grace_period=1", *overrides]
    words = ["python", "-m", "pipelines.cli", "sweep", "-c", f"{K8S_CONFIG}/sweep.yaml"]
    return shlex.join(words + [part for value in sets for part in ("--set", value)])


def apply_k8s(kind: str, overlay: str) -> int:
    """Run the overlay's RayJob on the RayCluster it selects (deployed before with `kubectl apply -k OVERLAY`).

    Only the RayJob and the job-config ConfigMap are applied; a finished RayJob is deleted first, since KubeRay
    runs a RayJob once (the same run name in job.yaml then resumes from its checkpoint on /runs).
    """
    import yaml

    kubectl = shutil.which("kubectl")
    if kubectl is None:
        print("error: kubectl is not installed; K8S=1 needs kubectl and a cluster (k8s/README.md)", file=sys.stderr)
        return 2
    probe = subprocess.run([kubectl, "version", "--request-timeout=5s"], capture_output=True, text=True)
    if probe.returncode != 0 or "Server Version" not in probe.stdout:
        reason = ((probe.stderr or probe.stdout).strip().splitlines() or ["no answer"])[-1]
        print(f"error: kubectl reaches no Kubernetes cluster ({reason}); check the kubeconfig context", file=sys.stderr)
        return 2
    rendered = subprocess.run([kubectl, "kustomize", str(ROOT / overlay)], capture_output=True, text=True, check=True)
    name = {"train": "endoflow-train", "sweep": "endoflow-sweep"}[kind]
    wanted = [
        doc
        for doc in yaml.safe_load_all(rendered.stdout)
        if doc
        and (
            (doc["kind"], doc["metadata"]["name"]) == ("RayJob", name)
            or (doc["kind"] == "ConfigMap" and doc["metadata"]["name"].startswith("endoflow-job-config"))
        )
    ]
    namespace = wanted[0]["metadata"]["namespace"]
    subprocess.run([kubectl, "-n", namespace, "delete", "rayjob", name, "--ignore-not-found", "--wait"], check=False)
    print(f"[cluster] kubectl apply: RayJob {name} and its job config from {overlay}", flush=True)
    code = subprocess.run([kubectl, "apply", "-f", "-"], input=yaml.safe_dump_all(wanted), text=True).returncode
    if code == 0:
        print(
            f"follow it: kubectl -n {namespace} get rayjob {name} -w; logs: kubectl -n {namespace} logs -f job/{name}"
        )
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["train", "sweep"])
    parser.add_argument("--runs-dir", help="runs_dir of the job (default: runs/cluster here, /runs on $RAY_ADDRESS)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra job config override")
    parser.add_argument("--k8s", action="store_true", help="apply the overlay's RayJob with kubectl instead")
    parser.add_argument("--overlay", default="k8s/overlays/cpu")
    args = parser.parse_args(argv)
    if args.k8s:
        return apply_k8s(args.kind, args.overlay)
    # Local nodes share this disk: an absolute path here is storage every node sees (Ray Train needs that).
    runs_dir = args.runs_dir or ("/runs" if os.environ.get("RAY_ADDRESS") else str(ROOT / "runs" / "cluster"))
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the local cluster as Ctrl-C does
    try:
        if args.kind == "train":
            status = run_job(train_entrypoint(runs_dir, args.overrides))
        else:  # Tune reserves a little CPU per trial beside its 2 one-CPU workers: two CPUs a node
            status = run_job(sweep_entrypoint(runs_dir, args.overrides), [NodeSpec(2), NodeSpec(2, {"worker_node": 1})])
    except KeyboardInterrupt:
        print("[cluster] interrupted; a job on $RAY_ADDRESS keeps running (ray job stop <id>)", file=sys.stderr)
        return 130
    return 0 if status == "SUCCEEDED" else 1


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
