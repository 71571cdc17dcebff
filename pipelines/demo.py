"""`endoflow demo`: the whole loop on the embedded simulator, on a local Ray, in a few minutes on a laptop CPU.

simulate → train source-only and FDA-style-transferred (Ray Train) → score on the real-like target → ONNX export and
parity → MLflow registry (name@alias) → Ray Serve → real HTTP requests → a table and runs/demo/report.json.
Beside the segmenter, Serve runs propagation graphs exported from an UNTRAINED propagation network (training one takes
longer than the whole demo): a short clip streams through a session to show the plumbing and its frames/s, and the
report says the masks mean nothing. `endoflow propagate train --register` gives graphs worth serving.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import statistics
import time
from pathlib import Path

import httpx
import mlflow
import numpy as np
from PIL import Image
from pydantic import Field
from rich.console import Console
from rich.table import Table

from pipelines.local_ray import local_ray
from pipelines.segment_flow import train_and_export
from pipelines.segmenter_release import VariantResult
from training.config import StrictModel
from training.data.classes import CLASS_NAMES
from training.data.sources import DataSpec, load_data
from training.loop import ComputeConfig
from training.metrics import SegmentationScores
from training.segment.config import SegmentJobConfig, StyleConfig
from training.tracking import TrackingConfig, register_onnx
from training.visualize import comparison_grid, png_bytes, save_png


class DemoConfig(StrictModel):
    runs_dir: str = "runs/demo"
    size: int = 256
    source_count: int = Field(400, description="labelled simulator frames (sim renderer)")
    target_count: int = Field(160, description="unlabelled real-like frames for style transfer")
    eval_count: int = Field(96, description="labelled real-like frames, only for scoring")
    epochs: int = 6
    workers: int = 2
    fda_beta: float = 0.01
    model_name: str = "endoflow-segmenter"
    alias: str = "champion"
    port: int = 8000
    requests: int = 32
    stream_frames: int = Field(24, ge=0, description="frames streamed through a propagation session (0: none)")


def variants(demo: DemoConfig) -> list[SegmentJobConfig]:
    target = DataSpec(kind="sim", style="real-like", count=demo.target_count, seed=1000, size=demo.size, labelled=False)
    val = DataSpec(kind="sim", style="real-like", count=32, seed=3000, size=demo.size)
    common = dict(
        runs_dir=demo.runs_dir,
        source=DataSpec(kind="sim", style="sim", count=demo.source_count, seed=0, size=demo.size),
        target=target,
        val=val,
        compute=ComputeConfig(epochs=demo.epochs, workers=demo.workers),
        tracking=TrackingConfig(experiment="endoflow-demo"),
    )
    return [
        SegmentJobConfig(name="source-only", style=StyleConfig(method="none"), **common),
        SegmentJobConfig(name="fda", style=StyleConfig(method="fda", beta=demo.fda_beta), **common),
    ]


def run_demo(demo: DemoConfig, console: Console | None = None) -> dict:
    console = console or Console()
    out_dir = Path(demo.runs_dir)
    started = time.perf_counter()
    eval_spec = DataSpec(kind="sim", style="real-like", count=demo.eval_count, seed=2000, size=demo.size)
    results: list[VariantResult] = []
    with local_ray(num_cpus=demo.workers) as ray_info:
        console.rule("[bold]EndoFlow demo")
        console.print(f"Ray: {ray_info} · MLflow store: {out_dir / 'mlflow.db'} (experiment endoflow-demo)")
        for cfg in variants(demo):
            console.rule(f"training {cfg.name} ({cfg.compute.epochs} epochs, {cfg.compute.workers} workers)")
            results.append(train_and_export(cfg, eval_spec, out_dir / "artifacts", fresh=True))
            console.print(f"{cfg.name}: mean Dice on real-like target {results[-1].summary['mean_dice']:.3f}")
        best = max(results, key=lambda r: r.summary["mean_dice"])
        version = _register(best, demo)
        console.print(f"registered {best.name} as models:/{demo.model_name}@{demo.alias} (version {version})")

        propagation = _untrained_propagation_graphs(demo, out_dir / "artifacts" / "propagation-untrained")
        console.rule(f"serving models:/{demo.model_name}@{demo.alias} with Ray Serve")
        serving = _serve_and_query(demo, eval_spec, best.predictions, console, propagation)

    images, masks = load_data(eval_spec)
    panels = {"truth": masks} | {r.name: r.predictions for r in results}
    overlays = save_png(comparison_grid(images, panels, rows=6), out_dir / "overlays.png")
    report = {
        "wall_seconds": round(time.perf_counter() - started, 1),
        "data": {
            "source": "simulator, sim renderer",
            "target": "simulator, real-like renderer (unlabelled for training)",
            "eval_frames": demo.eval_count,
        },
        "variants": {
            r.name: {
                "mean_dice": r.summary["mean_dice"],
                "mean_iou": r.summary["mean_iou"],
                "dice": r.summary["dice"],
                "iou": r.summary["iou"],
                "onnx_parity_max_abs_diff": r.parity_max_abs_diff,
                "train_seconds": round(r.train_seconds, 1),
                "parameters": r.parameters,
                "mlflow_run_id": r.run_id,
            }
            for r in results
        },
        "registered": {"model": f"models:/{demo.model_name}@{demo.alias}", "variant": best.name, "version": version},
        "serving": serving,
        "overlays": str(overlays),
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    _print_table(report, console)
    console.print(f"report: {out_dir / 'report.json'} · overlays: {overlays} · wall time {report['wall_seconds']} s")
    return report


def _register(best: VariantResult, demo: DemoConfig) -> str:
    """The better variant becomes `name@alias`, logged into its own training run."""
    with mlflow.start_run(run_id=best.run_id):
        return register_onnx(best.onnx_path, demo.model_name, demo.alias)


def _untrained_propagation_graphs(demo: DemoConfig, out_dir: Path) -> Path | None:
    """The three propagation graphs of an untrained network at the demo's frame size, for the serving plumbing."""
    if not demo.stream_frames:
        return None
    import torch

    from training.models.propagation.network import PropagationConfig, PropagationNet
    from training.propagate.export import export_propagation

    torch.manual_seed(0)
    export_propagation(PropagationNet(PropagationConfig()).eval(), out_dir, input_size=demo.size)
    return out_dir


def _serve_and_query(
    demo: DemoConfig,
    eval_spec: DataSpec,
    torch_predictions: np.ndarray,
    console: Console,
    propagation: Path | None = None,
) -> dict:
    """Send eval frames over HTTP; score the answers and compare them pixel by pixel with the torch model's; stream
    a clip through a propagation session when there are propagation graphs."""
    from ray import serve

    from serving.app import run_app

    base = f"http://127.0.0.1:{demo.port}"
    run_app(
        f"models:/{demo.model_name}@{demo.alias}",
        port=demo.port,
        blocking=False,
        tracking_uri=mlflow.get_tracking_uri(),
        propagation_model=str(propagation) if propagation else None,
    )
    try:
        images, masks = load_data(eval_spec.model_copy(update={"count": demo.requests}))
        scores = SegmentationScores(CLASS_NAMES)
        latencies_ms, agreeing_pixels = [], 0
        with httpx.Client(base_url=base, timeout=30) as client:
            health = client.get("/healthz").json()
            for image, mask, expected in zip(images, masks, torch_predictions, strict=False):
                body = png_bytes(image)
                sent = time.perf_counter()
                response = client.post("/v1/segment", content=body, headers={"content-type": "image/png"})
                latencies_ms.append((time.perf_counter() - sent) * 1000)
                response.raise_for_status()
                served = np.asarray(Image.open(io.BytesIO(response.content)))
                scores.update(mask, served)
                agreeing_pixels += int((served == expected).sum())
            bad = client.post("/v1/segment", content=b"not an image", headers={"content-type": "image/png"})
            stream = _stream_session(client, images[0], masks[0], demo.stream_frames) if propagation else None
        latencies_ms.sort()
        summary = scores.summary()
        console.print(f"{len(latencies_ms)} requests, p50 {statistics.median(latencies_ms):.1f} ms")
        return {
            "url": f"{base}/v1/segment",
            "health": health,
            "requests": len(latencies_ms),
            "latency_ms_p50": round(statistics.median(latencies_ms), 2),
            "latency_ms_p95": round(latencies_ms[int(0.95 * (len(latencies_ms) - 1))], 2),
            "served_mean_dice": summary["mean_dice"],
            "served_vs_torch_pixel_agreement": agreeing_pixels / max(1, masks[: len(latencies_ms)].size),
            "bad_request_status": bad.status_code,
            "bad_request_body": bad.json(),
            "propagation": stream and {"graphs": str(propagation), **stream},
        }
    finally:
        serve.shutdown()


def _stream_session(client: httpx.Client, image: np.ndarray, mask: np.ndarray, frames: int) -> dict:
    """Open a propagation session on `image` and its mask, then send `frames` frames of the scene drifting right by
    two pixels a frame (a stand-in clip); -> frames/s over HTTP, one frame at a time as a live video would."""
    opened = client.post(
        "/v1/propagate/sessions",
        json={"frame": base64.b64encode(png_bytes(image)).decode(), "mask": base64.b64encode(png_bytes(mask)).decode()},
    )
    opened.raise_for_status()
    session, route = opened.json()["session"], opened.json()["headers"]
    bodies = [png_bytes(np.roll(image, 2 * t, axis=1)) for t in range(1, frames + 1)]
    latencies_ms = []
    started = time.perf_counter()
    for body in bodies:
        sent = time.perf_counter()
        client.post(f"/v1/propagate/sessions/{session}/frames", content=body, headers=route).raise_for_status()
        latencies_ms.append((time.perf_counter() - sent) * 1000)
    seconds = time.perf_counter() - started
    client.delete(f"/v1/propagate/sessions/{session}")
    return {
        "trained": False,
        "note": "an untrained propagation network: this measures the serving path; its masks mean nothing",
        "frames": frames,
        "frames_per_second": round(frames / seconds, 1),
        "frame_latency_ms_p50": round(statistics.median(latencies_ms), 2),
    }


def _print_table(report: dict, console: Console) -> None:
    table = Table(title="Dice on the real-like target (held-out, labels never used for training)")
    table.add_column("class")
    names = list(report["variants"])
    for name in names:
        table.add_column(name, justify="right")
    for class_name in CLASS_NAMES[1:]:
        row = [report["variants"][n]["dice"].get(class_name) for n in names]
        table.add_row(class_name, *("—" if v is None else f"{v:.3f}" for v in row))
    table.add_row("[bold]mean Dice", *(f"[bold]{report['variants'][n]['mean_dice']:.3f}" for n in names))
    table.add_row("ONNX parity (max |Δ|)", *(f"{report['variants'][n]['onnx_parity_max_abs_diff']:.1e}" for n in names))
    table.add_row("train seconds", *(str(report["variants"][n]["train_seconds"]) for n in names))
    console.print(table)
    serving = report["serving"]
    console.print(
        f"Serve: {serving['requests']} HTTP requests, p50 {serving['latency_ms_p50']} ms, "
        f"p95 {serving['latency_ms_p95']} ms, served mean Dice {serving['served_mean_dice']:.3f}; "
        f"bad input → {serving['bad_request_status']} {serving['bad_request_body']}"
    )
    if stream := serving.get("propagation"):
        console.print(
            f"Propagation session: {stream['frames']} frames at {stream['frames_per_second']} frames/s over HTTP "
            f"(p50 {stream['frame_latency_ms_p50']} ms a frame; untrained network, plumbing only)"
        )


def clean(demo: DemoConfig) -> None:
    shutil.rmtree(demo.runs_dir, ignore_errors=True)
