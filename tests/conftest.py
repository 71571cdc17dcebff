"""What several test modules share: one private local Ray per test session (removed afterwards), the vocalfolds
root, a hand-built colour-classifier ONNX with serving helpers, an untrained propagation export with a clip to
stream through it, and a lossless video writer. Test modules import the plain helpers from here
(`from conftest import ...`) and get the fixtures from pytest, rather than importing each other.

The colour classifier is a 1x1 Conv 3->7 with fixed weights: with mean = std = 0.5 a saturated colour normalises to
+-1 per channel, and each class's weight row is the +-1 pattern of "its" colour, so that colour scores 3 there and at
most 1 anywhere else. Mid grey normalises to ~0 and falls to the bias of class 0 (void).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import struct
import subprocess
import sys
import time
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

VOCALFOLDS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "vocalfolds"


@pytest.fixture(scope="session")
def ray_session():
    from pipelines.local_ray import local_ray

    with local_ray(num_cpus=max(2, os.cpu_count() or 2)) as info:
        yield info


@pytest.fixture(scope="session")
def vocalfolds_root() -> Path:
    if not (VOCALFOLDS / "img").is_dir():
        pytest.skip(f"real vocalfolds frames not present at {VOCALFOLDS}")
    return VOCALFOLDS


# ---- the colour classifier and serving it ---------------------------------------------------------------

CLASS_NAMES = ["void", "red", "green", "blue", "white", "black", "yellow"]
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}
COLOURS |= {"black": (0, 0, 0), "yellow": (255, 255, 0), "void": (128, 128, 128)}
WEIGHTS = np.array(
    [[0, 0, 0], [1, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, 1], [-1, -1, -1], [1, 1, -1]], dtype=np.float32
)
BIAS = np.array([0.5, 0, 0, 0, 0, 0, 0], dtype=np.float32)
INPUT_SIZE = [32, 64]


def metadata_props() -> dict[str, str]:
    return {
        "endoflow.task": "segmentation",
        "endoflow.class_names": json.dumps(CLASS_NAMES),
        "endoflow.input_size": json.dumps(INPUT_SIZE),
        "endoflow.normalization": json.dumps({"mean": [0.5] * 3, "std": [0.5] * 3}),
        "endoflow.size_multiple": "32",
        "endoflow.source_run_id": "",
    }


def make_model(props: dict[str, str] | None = None, bias: np.ndarray = BIAS) -> onnx.ModelProto:
    weight = numpy_helper.from_array(WEIGHTS.reshape(7, 3, 1, 1), "weight")
    bias = numpy_helper.from_array(bias, "bias")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "weight", "bias"], ["logits"])],
        "colour_classifier",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 7, "H", "W"])],
        [weight, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by any recent onnxruntime
    helper.set_model_props(model, metadata_props() if props is None else props)
    onnx.checker.check_model(model)
    return model


def save_model(path: Path, props: dict[str, str] | None = None, bias: np.ndarray = BIAS) -> Path:
    onnx.save_model(make_model(props, bias), str(path))
    return path


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    return save_model(tmp_path / "model.onnx")


def solid(colour: str, height: int = 50, width: int = 70) -> np.ndarray:
    return np.broadcast_to(np.array(COLOURS[colour], dtype=np.uint8), (height, width, 3)).copy()


def to_bytes(image: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but carries no pixel data: a decompression-bomb stand-in."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


BAD_BODIES = {
    "empty": (b"", 400),
    "not an image": (b'{"image": "please"}', 415),
    "gif": (b"GIF89a" + b"\x00" * 32, 415),
    "truncated png": (to_bytes(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))[:300], 400),
    "huge dimensions": (png_header_only(100_000, 100_000), 413),
    "garbage after png signature": (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, 400),
}


@contextlib.contextmanager
def serving(model: Path, **options) -> Iterator[str]:
    """Serve `model` on a free loopback port for one test module; yields the base URL, leaves no app behind."""
    from ray import serve

    from pipelines.local_ray import free_port
    from serving.app import run_app

    port = free_port()
    options.setdefault("reload_interval_s", 0)
    try:
        run_app(str(model), port=port, host="127.0.0.1", **options)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


def normalised(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) -> the model's FP32 (1, 3, H, W) input (mean = std = 0.5)."""
    return ((image.astype(np.float32) / 255 - 0.5) / 0.5).transpose(2, 0, 1)[None].copy()


# ---- propagation graphs and a clip to stream --------------------------------------------------------------

CLIP_SIZE = 64  # the side of `clip`'s frames and of graphs_dir's input


@pytest.fixture(scope="module")
def graphs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from training.models.propagation.network import PropagationConfig, PropagationNet
    from training.propagate.export import export_propagation
    from training.propagate.inference import MemoryPolicy

    out = tmp_path_factory.getbasetemp() / "propagation_graphs"  # one export per test session (test_web_page too)
    if (out / "propagation.segment.onnx").exists():
        return out
    torch.manual_seed(0)
    small = PropagationConfig(key_dim=8, value_dim=16, c4=8, c8=16, c16=24, decoder_width=16)
    export_propagation(
        PropagationNet(small).eval(), out, input_size=CLIP_SIZE, policy=MemoryPolicy(mem_every=2, max_memory=3)
    )
    return out


def retrained(graphs_dir: Path, out: Path, run_id: str, scale: float = 1.25) -> Path:
    """The three graphs as if exported by another training run: weights scaled, endoflow.source_run_id changed."""
    out.mkdir(parents=True, exist_ok=True)
    from serving.propagation import GRAPHS

    for graph in GRAPHS:
        file = f"propagation.{graph}.onnx"
        model = onnx.load(str(graphs_dir / file))
        for tensor in model.graph.initializer:
            if tensor.data_type == onnx.TensorProto.FLOAT and len(tensor.dims) >= 2:  # conv/linear weights only
                tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * scale, tensor.name))
        props = {p.key: p.value for p in model.metadata_props}
        helper.set_model_props(model, props | {"endoflow.source_run_id": run_id})
        onnx.save_model(model, str(out / file))
    return out


def clip(frames: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """A disc drifting right over a gradient, and the first frame's mask (disc = 3, left band = 1)."""
    y, x = np.mgrid[0:CLIP_SIZE, 0:CLIP_SIZE]
    images = []
    for t in range(frames):
        disc = (x - 20 - 3 * t) ** 2 + (y - 32) ** 2 < 100
        rgb = np.stack([x * 3, y * 3, np.where(disc, 250, 40)], axis=-1)
        images.append(rgb.clip(0, 255).astype(np.uint8))
    mask = np.zeros((CLIP_SIZE, CLIP_SIZE), np.uint8)
    mask[(x - 20) ** 2 + (y - 32) ** 2 < 100] = 3
    mask[:, :6] = 1
    return np.stack(images), mask


def write_video(path: Path, frames: np.ndarray, rate: int = 25) -> Path:
    """(T, H, W, 3) uint8 RGB frames as an FFV1 video in Matroska: lossless, and stored as RGB (no YUV rounding,
    no chroma subsampling), so that decoding gives the frames back exactly."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=rate)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "bgr0"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush the encoder
    return path


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_array(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


ENDOFLOW = Path(sys.executable).parent / "endoflow"  # the venv running the tests


@contextlib.contextmanager
def endoflow_serve(args: list[str], log_path: Path, timeout_s: float = 300) -> Iterator[subprocess.Popen]:
    """`endoflow serve ARGS` in the background until /healthz answers; stopped (SIGTERM) afterwards."""
    port = int(args[args.index("--port") + 1])
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"  # nothing routes to a stopping replica here
    }
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [str(ENDOFLOW), "serve", *args], cwd=log_path.parent, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as reply:
                        if reply.status == 200:
                            break
                except OSError:
                    pass
                assert server.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, f"not healthy: {log_path.read_text()[-3000:]}"
                time.sleep(1)
            yield server
        finally:
            if server.poll() is None:
                server.terminate()
                try:
                    server.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    server.kill()
