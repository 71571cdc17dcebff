"""docs/serve-propagation.md, run as written: its WebSocket client (the python block) and its curl clip (the bash
block under "The same over plain HTTP"), against a server holding the registry refs the walkthrough registers and
serves, so the page cannot drift from the protocol.

The registry is filled by the calls `propagate train --register` and `segment train --register` make
(training.tracking.register_onnx: NAME-<graph> per propagation graph, NAME for the segmenter), with graphs_dir's
untrained export and the colour classifier standing in for trained models: training and its `--register` path are
test_propagate_job.py's and test_propagate_registry.py's part, `endoflow serve` itself test_serve_cli.py's.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import b64, clip, png_array, save_model, serving, to_bytes

from serving.propagation_graphs import GRAPHS

pytestmark = pytest.mark.slow

DOC = Path(__file__).resolve().parents[1] / "docs" / "serve-propagation.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def sections() -> dict[str, str]:
    """Heading text -> the text under it, up to the next heading."""
    parts = re.split(r"^#+ (.+)$", DOC.read_text(), flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def block(heading_start: str, language: str) -> str:
    """The one fenced `language` block under the heading that starts with `heading_start`."""
    (text,) = [body for heading, body in sections().items() if heading.startswith(heading_start)]
    (code,) = [code for lang, code in FENCE.findall(text) if lang == language]
    return code


def registered(heading_start: str) -> str:
    """NAME@ALIAS of the `--register` in the section's command."""
    return re.search(r"--register (\S+)", block(heading_start, "bash")).group(1)


PROPAGATION = registered("1. ")
SEGMENTER = registered("2. ")


def test_the_served_refs_are_the_registered_ones() -> None:
    serve = block("3. ", "bash")
    assert f"--model models:/{SEGMENTER}" in serve and f"--propagation-model models:/{PROPAGATION}" in serve, serve


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, graphs_dir: Path) -> str:
    import mlflow

    from training import tracking

    root = tmp_path_factory.mktemp("walkthrough-registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)  # register_onnx logs into the active run, as the train commands do
    try:
        experiment = mlflow.create_experiment("walkthrough", artifact_location=(root / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            name, alias = PROPAGATION.split("@")
            for graph in GRAPHS:
                tracking.register_onnx(graphs_dir / f"propagation.{graph}.onnx", f"{name}-{graph}", alias)
            tracking.register_onnx(save_model(root / "colours.onnx"), *SEGMENTER.split("@"))
    finally:
        mlflow.set_tracking_uri(previous)
    return uri


@pytest.fixture(scope="module")
def url(ray_session, registry: str, tmp_path_factory: pytest.TempPathFactory):
    cache = tmp_path_factory.mktemp("walkthrough-cache")
    options = {"propagation_model": f"models:/{PROPAGATION}", "tracking_uri": registry, "cache_dir": str(cache)}
    with serving(f"models:/{SEGMENTER}", **options) as base_url:
        yield base_url


@pytest.fixture
def frames_dir(tmp_path: Path) -> Path:
    frames, mask = clip(10)
    (tmp_path / "frames").mkdir()
    for t, frame in enumerate(frames):
        (tmp_path / "frames" / f"{t:04d}.png").write_bytes(to_bytes(frame))
    (tmp_path / "mask.png").write_bytes(to_bytes(mask))
    return tmp_path / "frames"


def clip_masks(url: str, frames: list[Path], mask: bytes) -> list[np.ndarray]:
    """What POST /v1/propagate/clip answers for these frames and first mask (tested against streams elsewhere)."""
    doc = {"frames": [b64(f.read_bytes()) for f in frames], "mask": b64(mask)}
    answer = httpx.post(f"{url}/v1/propagate/clip", json=doc, timeout=120)
    assert answer.status_code == 200, answer.text
    return [png_array(base64.b64decode(m)) for m in answer.json()["masks"]]


def segmented(url: str, frame: Path) -> bytes:
    answer = httpx.post(f"{url}/v1/segment", content=frame.read_bytes(), headers={"Content-Type": "image/png"})
    assert answer.status_code == 200, answer.text
    return answer.content


@pytest.mark.parametrize("own_mask", [True, False], ids=["given-mask", "segmenter-mask"])
def test_websocket_client_streams_the_clips_masks(url: str, frames_dir: Path, own_mask: bool) -> None:
    frames = sorted(frames_dir.glob("*.png"))
    mask_file = frames_dir.parent / "mask.png"
    env = os.environ | {"ENDOFLOW_URL": url, "FRAMES": str(frames_dir), "MASK": str(mask_file) if own_mask else ""}
    run = subprocess.run(
        [sys.executable, "-c", block("Client", "python")],
        cwd=frames_dir.parent,
        env=env | {"OUT": "masks"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"{len(frames) - 1} masks in masks/" in run.stdout, run.stdout
    assert "follows labels []" not in run.stdout, run.stdout  # the segmenter's mask has objects too
    first_mask = mask_file.read_bytes() if own_mask else segmented(url, frames[0])
    expected = clip_masks(url, frames, first_mask)[1:]
    written = sorted((frames_dir.parent / "masks").glob("*.png"))
    assert [p.name for p in written] == [p.name for p in frames[1:]]
    for t, (path, truth) in enumerate(zip(written, expected, strict=True), start=1):
        got = png_array(path.read_bytes())
        assert got.shape == (64, 64) and np.array_equal(got, truth), t
    if own_mask:
        assert "follows labels [1, 3]" in run.stdout, run.stdout  # clip()'s mask: a band (1) and a disc (3)


@pytest.mark.skipif(not (shutil.which("curl") and shutil.which("base64")), reason="needs curl and GNU base64")
def test_curl_clip(url: str, frames_dir: Path) -> None:
    run = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block("5. ", "bash")],
        cwd=frames_dir.parent,
        env=os.environ | {"ENDOFLOW_URL": url, "FRAMES": str(frames_dir)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip().endswith("8 masks"), run.stdout
    frames = sorted(frames_dir.glob("*.png"))[:8]
    expected = clip_masks(url, frames, segmented(url, frames[0]))
    answer = json.loads((frames_dir.parent / "masks.json").read_text())
    got = [png_array(base64.b64decode(m)) for m in answer["masks"]]
    assert len(got) == 8 and all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))
