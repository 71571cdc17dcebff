"""The deployment files validate offline (k8s/validate.sh), and the KubeRay schema check really rejects mistakes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ROOT.parent / "shared" / "schemas" / "kuberay"
CHECK_JSONSCHEMA = Path(sys.executable).parent / "check-jsonschema"

pytestmark = [
    pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed (it renders the overlays)"),
    pytest.mark.skipif(not SCHEMAS.is_dir(), reason=f"KubeRay schemas not present at {SCHEMAS}"),
]


def test_validate_script_passes() -> None:
    result = subprocess.run(
        ["bash", str(ROOT / "k8s" / "validate.sh")], cwd=ROOT, capture_output=True, text=True, timeout=180
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "all checks passed" in output


@pytest.fixture
def rendered_raycluster() -> dict:
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(ROOT / "k8s" / "overlays" / "cpu")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    clusters = [doc for doc in yaml.safe_load_all(rendered) if doc and doc.get("kind") == "RayCluster"]
    assert len(clusters) == 1
    return clusters[0]


def check_raycluster(manifest: dict, path: Path) -> subprocess.CompletedProcess:
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    schema = SCHEMAS / "raycluster_v1.json"
    return subprocess.run(
        [str(CHECK_JSONSCHEMA), "--schemafile", str(schema), str(path)], capture_output=True, text=True, timeout=60
    )


def test_unknown_raycluster_field_is_rejected(rendered_raycluster: dict, tmp_path: Path) -> None:
    # The untouched manifest passes, so the failure below is the bogus field's alone.
    assert check_raycluster(rendered_raycluster, tmp_path / "good.yaml").returncode == 0

    rendered_raycluster["spec"]["headGroupSpec"]["replicaCount"] = 1  # not a KubeRay field
    result = check_raycluster(rendered_raycluster, tmp_path / "bogus.yaml")
    assert result.returncode != 0
    assert "replicaCount" in result.stdout + result.stderr
