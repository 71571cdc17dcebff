"""Offline checks of the rendered manifests that no schema can make; k8s/validate.sh drives it.

  split OUT RENDERED...   one file per document: OUT/core/ (kubernetes-validate) and OUT/<Kind>/ (KubeRay schemas)
  check RENDERED...       cross-references and the application-level content:
    - every ConfigMap and PVC a pod mounts is rendered; every Secret name and key used is in secrets.example.yaml;
    - every Service, PodDisruptionBudget and NetworkPolicy selector matches some pod template;
    - every container (Ray ones included) has cpu/memory requests and limits and runs without privilege escalation;
    - rayVersion is the lock's Ray; the Dockerfiles' pins (serve packages, torch) are the lock's;
    - the RayService's serveConfigV2 passes Ray Serve's schema and its import_path builds the application;
    - each RayJob's entrypoint parses as an `endoflow` command and its job config (from the ConfigMap mounted at
      /config, with the entrypoint's --set overrides) loads into the job's config class.
Rendered files are named after their overlay (cpu.yaml, gpu.yaml); messages say which one failed.
"""

from __future__ import annotations

import re
import shlex
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

K8S = Path(__file__).resolve().parent
ROOT = K8S.parent
RAY_KINDS = ("RayCluster", "RayJob", "RayService")
SECRETS_EXAMPLE = K8S / "secrets.example.yaml"
LOCK = ROOT / "requirements.lock"
SERVE_DOCKERFILE = ROOT / "docker" / "Dockerfile.serve"
TRAIN_DOCKERFILE = ROOT / "docker" / "Dockerfile.train"
# Where the serving image puts serve_entry.py (/app): importing it from docker/ mirrors the image's path.
SERVE_ENTRY_DIR = ROOT / "docker"


def load_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def split(out: Path, rendered: list[Path]) -> None:
    counts: dict[str, int] = {}
    for path in rendered:
        for index, doc in enumerate(load_documents(path)):
            kind = doc.get("kind", "Unknown")
            group = kind if kind in RAY_KINDS else "core"
            name = doc.get("metadata", {}).get("name", "unnamed")
            target = out / group / f"{path.stem}-{index:02d}-{kind}-{name}.yaml"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(yaml.safe_dump(doc, sort_keys=False))
            counts[group] = counts.get(group, 0) + 1
    print("split: " + ", ".join(f"{n} {group}" for group, n in sorted(counts.items())))


# --- walking pod templates, wherever a kind keeps them -------------------------------------------------------


def pod_templates(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod template) for every pod template in a document, Ray custom resources included."""
    kind, spec = doc.get("kind"), doc.get("spec") or {}
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        yield "spec.template", spec.get("template", {})
    elif kind == "RayCluster":
        yield from ray_cluster_templates(spec, "spec")
    elif kind == "RayJob":
        if "rayClusterSpec" in spec:
            yield from ray_cluster_templates(spec["rayClusterSpec"], "spec.rayClusterSpec")
        if "submitterPodTemplate" in spec:
            yield "spec.submitterPodTemplate", spec["submitterPodTemplate"]
    elif kind == "RayService":
        yield from ray_cluster_templates(spec.get("rayClusterConfig", {}), "spec.rayClusterConfig")


def ray_cluster_templates(cluster: dict[str, Any], where: str) -> Iterator[tuple[str, dict[str, Any]]]:
    yield f"{where}.headGroupSpec", cluster.get("headGroupSpec", {}).get("template", {})
    for group in cluster.get("workerGroupSpecs", []):
        yield f"{where}.workerGroupSpecs[{group.get('groupName')}]", group.get("template", {})


def containers(template: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = template.get("spec", {})
    yield from spec.get("initContainers", [])
    yield from spec.get("containers", [])


def ray_cluster_specs(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = doc.get("spec") or {}
    if doc.get("kind") == "RayCluster":
        yield spec
    elif doc.get("kind") == "RayJob" and "rayClusterSpec" in spec:
        yield spec["rayClusterSpec"]
    elif doc.get("kind") == "RayService":
        yield spec.get("rayClusterConfig", {})


def label(doc: dict[str, Any]) -> str:
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


# --- the checks ----------------------------------------------------------------------------------------------


def check_references(docs: list[dict[str, Any]], secrets: dict[str, set[str]]) -> list[str]:
    rendered = {(d["kind"], d["metadata"]["name"]) for d in docs}
    problems = []

    def need(kind: str, name: str, where: str) -> None:
        if (kind, name) not in rendered:
            problems.append(f"{where}: {kind} {name!r} is not rendered")

    def need_secret(name: str, key: str | None, where: str) -> None:
        if name not in secrets:
            problems.append(f"{where}: Secret {name!r} is not in {SECRETS_EXAMPLE.name}")
        elif key is not None and key not in secrets[name]:
            problems.append(f"{where}: Secret {name!r} has no key {key!r} in {SECRETS_EXAMPLE.name}")

    for doc in docs:
        for where, template in pod_templates(doc):
            where = f"{label(doc)} {where}"
            spec = template.get("spec", {})
            for volume in spec.get("volumes", []):
                if "configMap" in volume:
                    need("ConfigMap", volume["configMap"]["name"], where)
                if "persistentVolumeClaim" in volume:
                    need("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"], where)
                if "secret" in volume:
                    need_secret(volume["secret"]["secretName"], None, where)
            for container in containers(template):
                for env in container.get("env", []):
                    source = env.get("valueFrom", {})
                    if "secretKeyRef" in source:
                        need_secret(source["secretKeyRef"]["name"], source["secretKeyRef"]["key"], where)
                    if "configMapKeyRef" in source:
                        need("ConfigMap", source["configMapKeyRef"]["name"], where)
                for env_from in container.get("envFrom", []):
                    if "secretRef" in env_from:
                        need_secret(env_from["secretRef"]["name"], None, where)
                    if "configMapRef" in env_from:
                        need("ConfigMap", env_from["configMapRef"]["name"], where)
        for cluster in ray_cluster_specs(doc):
            auth = cluster.get("authOptions", {})
            if auth.get("secretName"):
                need_secret(auth["secretName"], "auth_token", f"{label(doc)} authOptions")
    return problems


def check_selectors(docs: list[dict[str, Any]]) -> list[str]:
    pod_labels = [
        (doc.get("metadata", {}).get("namespace"), template.get("metadata", {}).get("labels", {}))
        for doc in docs
        for _, template in pod_templates(doc)
    ]

    def matches(selector: dict[str, str], namespace: str | None) -> bool:
        return any(
            ns == namespace and all(labels.get(k) == v for k, v in selector.items()) for ns, labels in pod_labels
        )

    problems = []
    for doc in docs:
        kind, spec, namespace = doc["kind"], doc.get("spec") or {}, doc["metadata"].get("namespace")
        selectors = []
        if kind == "Service" and spec.get("selector"):
            selectors.append(("spec.selector", spec["selector"]))
        elif kind in ("PodDisruptionBudget", "Deployment", "StatefulSet"):
            selectors.append(("spec.selector", spec.get("selector", {}).get("matchLabels", {})))
        elif kind == "NetworkPolicy":
            selectors.append(("spec.podSelector", spec.get("podSelector", {}).get("matchLabels", {})))
            for rule in spec.get("ingress", []):
                for peer in rule.get("from", []):
                    # A peer with a namespaceSelector points outside (e.g. the KubeRay operator).
                    if "podSelector" in peer and "namespaceSelector" not in peer:
                        selectors.append(("ingress.from.podSelector", peer["podSelector"].get("matchLabels", {})))
        for where, selector in selectors:
            if selector and not matches(selector, namespace):
                problems.append(f"{label(doc)} {where} {selector} matches no pod template")
    return problems


def check_containers(docs: list[dict[str, Any]]) -> list[str]:
    problems = []
    for doc in docs:
        checked = [
            (f"{where} {c.get('name')}", c, template.get("spec", {}).get("securityContext", {}))
            for where, template in pod_templates(doc)
            for c in containers(template)
        ]
        for cluster in ray_cluster_specs(doc):
            if cluster.get("enableInTreeAutoscaling"):
                checked.append(("autoscalerOptions", cluster.get("autoscalerOptions", {}), {}))
        for where, container, pod_security in checked:
            where = f"{label(doc)} {where}"
            resources = container.get("resources", {})
            for part in ("requests", "limits"):
                missing = {"cpu", "memory"} - set(resources.get(part, {}))
                if missing:
                    problems.append(f"{where}: no {part} for {sorted(missing)}")
            security = container.get("securityContext", {})
            if security.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: securityContext.allowPrivilegeEscalation must be false")
            if not (security.get("runAsNonRoot") or pod_security.get("runAsNonRoot")):
                problems.append(f"{where}: runAsNonRoot is not set (container or pod)")
    return problems


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.strip().split("==", 1)
            pins[normalize(name)] = version
    return pins


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def build_args(dockerfile: str) -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)", dockerfile, re.MULTILINE))


def check_pins(docs: list[dict[str, Any]]) -> list[str]:
    pins, problems = lock_pins(), []
    for doc in docs:
        for cluster in ray_cluster_specs(doc):
            if cluster.get("rayVersion") != pins["ray"]:
                version = cluster.get("rayVersion")
                problems.append(f"{label(doc)}: rayVersion {version!r} is not the lock's {pins['ray']}")
    dockerfile = SERVE_DOCKERFILE.read_text()
    arg = build_args(dockerfile)
    for name, version in re.findall(r'"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^"]+)"', dockerfile):
        locked = pins.get(normalize(name))
        if locked != version:
            problems.append(f"Dockerfile.serve pins {name}=={version}; requirements.lock has {locked}")
    ort_version, locked_ort = arg.get("ORT_VERSION"), pins.get("onnxruntime")
    if ort_version != locked_ort:
        problems.append(f"Dockerfile.serve ORT_VERSION={ort_version}; the lock's onnxruntime is {locked_ort}")
    torch_version = build_args(TRAIN_DOCKERFILE.read_text()).get("TORCH_VERSION")
    locked_torch = pins.get("torch", "").split("+")[0]
    if torch_version != locked_torch:
        problems.append(f"Dockerfile.train TORCH_VERSION={torch_version}; the lock's torch is {locked_torch}")
    return problems


def check_serve_configs(docs: list[dict[str, Any]]) -> list[str]:
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema

    problems = []
    torch_before = "torch" in sys.modules
    for doc in docs:
        if doc["kind"] != "RayService":
            continue
        try:
            config = ServeDeploySchema.model_validate(yaml.safe_load(doc["spec"]["serveConfigV2"]))
        except Exception as err:  # pydantic's message names the field
            problems.append(f"{label(doc)} serveConfigV2: {err}")
            continue
        for app in config.applications:
            module_name, _, attribute = app.import_path.partition(":")
            try:
                module = __import__(module_name, fromlist=[attribute])
                call_user_app_builder_with_args_if_necessary(getattr(module, attribute), app.args)
            except Exception as err:
                problems.append(f"{label(doc)} application {app.name!r} ({app.import_path}): {err}")
            for deployment in app.deployments:
                if deployment.name != "SegmentationService":
                    problems.append(f"{label(doc)}: no deployment named {deployment.name!r} in serving.app")
        if not torch_before and "torch" in sys.modules:
            problems.append(f"{label(doc)}: building the serving application imported torch")
    return problems


def check_jobs(docs: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """Entrypoints parse as endoflow commands; job configs load. Returns (problems, notes)."""
    import typer

    from pipelines.cli import app

    cli = typer.main.get_command(app)
    problems, notes = [], []
    clusters = {d["metadata"]["name"]: d for d in docs if d["kind"] == "RayCluster"}
    config_maps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    for doc in docs:
        if doc["kind"] != "RayJob":
            continue
        argv = shlex.split(doc["spec"]["entrypoint"])
        if argv[0] != "endoflow":
            problems.append(f"{label(doc)}: entrypoint {argv[0]!r} is not the endoflow CLI")
            continue
        # A noun then a verb (`endoflow segment train`): walk the groups down to the command.
        command, depth = cli, 1
        while hasattr(command, "commands") and len(argv) > depth and argv[depth] in command.commands:
            command, depth = command.commands[argv[depth]], depth + 1
        name = " ".join(argv[1:depth])
        if command is cli or hasattr(command, "commands"):
            notes.append(
                f"{label(doc)}: `endoflow {' '.join(argv[1:])}` is not implemented yet; entrypoint kept as planned"
            )
            continue
        try:
            params = command.make_context(name, argv[depth:], resilient_parsing=False).params
        except Exception as err:  # typer ships its own click: its usage errors have format_message()
            message = err.format_message() if hasattr(err, "format_message") else str(err)
            problems.append(f"{label(doc)}: `{' '.join(argv)}`: {message}")
            continue
        config_path = params.get("config")
        if config_path is None:
            continue
        text = config_text(doc, Path(config_path), clusters, config_maps)
        if text is None:
            problems.append(f"{label(doc)}: {config_path} is not in a ConfigMap mounted on its cluster's head")
            continue
        error = load_job_config(name, text, params.get("set_") or [])
        if error:
            problems.append(f"{label(doc)}: {config_path}: {error}")
        register = params.get("register")
        if register is not None and not re.fullmatch(r"[^@/\s]+(@[^@/\s]+)?", register):
            problems.append(f"{label(doc)}: --register {register!r} is not NAME or NAME@ALIAS")
    return problems, notes


def config_text(job: dict[str, Any], path: Path, clusters: dict, config_maps: dict) -> str | None:
    """The file at `path` as the job's cluster head sees it: the data of the ConfigMap mounted above it."""
    spec = job["spec"]
    if "rayClusterSpec" in spec:
        cluster_spec = spec["rayClusterSpec"]
    else:
        cluster = clusters.get(spec.get("clusterSelector", {}).get("ray.io/cluster"))
        if cluster is None:
            return None
        cluster_spec = cluster["spec"]
    head = cluster_spec["headGroupSpec"]["template"]["spec"]
    volumes = {v["name"]: v for v in head.get("volumes", [])}
    for mount in head["containers"][0].get("volumeMounts", []):
        mount_path = Path(mount["mountPath"])
        if path.parent == mount_path and "configMap" in volumes.get(mount["name"], {}):
            config_map = config_maps.get(volumes[mount["name"]]["configMap"]["name"])
            return None if config_map is None else config_map.get("data", {}).get(path.name)
    return None


def load_job_config(command: str, text: str, overrides: list[str]) -> str | None:
    from training.config import ConfigError, load_config

    config_classes = {
        "segment train": "training.segment.config:SegmentJobConfig",
        "adapt train": "training.adapt.config:AdaptJobConfig",
    }
    if command not in config_classes:
        return None
    module_name, _, class_name = config_classes[command].partition(":")
    config_class = getattr(__import__(module_name, fromlist=[class_name]), class_name)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as handle:
        handle.write(text)
        handle.flush()
        try:
            load_config(config_class, handle.name, overrides)
        except ConfigError as err:
            return str(err)
    return None


def check(rendered: list[Path]) -> int:
    secrets = {
        doc["metadata"]["name"]: set(doc.get("stringData", {})) | set(doc.get("data", {}))
        for doc in load_documents(SECRETS_EXAMPLE)
        if doc.get("kind") == "Secret"
    }
    overlays = {path.stem: load_documents(path) for path in rendered}
    problems: dict[str, list[str]] = {}
    # Serving first, for every overlay: its no-torch check means something only before the job checks load torch.
    for name, docs in overlays.items():
        problems[name] = check_references(docs, secrets) + check_selectors(docs) + check_containers(docs)
        problems[name] += check_pins(docs) + check_serve_configs(docs)
    for name, docs in overlays.items():
        job_problems, notes = check_jobs(docs)
        problems[name] += job_problems
        for note in notes:
            print(f"  note [{name}] {note}")
    for name, docs in overlays.items():
        for problem in problems[name]:
            print(f"  FAIL [{name}] {problem}")
        print(f"check [{name}]: {len(docs)} objects, {len(problems[name])} problems")
    return 1 if any(problems.values()) else 0


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "split":
        split(Path(argv[1]), [Path(p) for p in argv[2:]])
        return 0
    if len(argv) >= 2 and argv[0] == "check":
        sys.path[:0] = [str(SERVE_ENTRY_DIR), str(ROOT)]
        return check([Path(p) for p in argv[1:]])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
