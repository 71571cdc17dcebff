"""Serving benchmark: the same segmenter, the same machine, one run, four ways of answering a request.

  (a) bare      onnxruntime in this process: normalised FP32 [1, 3, S, S] -> session.run -> the service's argmax
  (b) v2        this service, Open Inference Protocol v2, binary FP32 in -> binary UINT8 labels out; and binary
                UINT8 RGB pixels in (normalised by the server, 4x fewer bytes), paired with bare onnxruntime on the same
                pixels (serving/pixels.py's normalisation, then the same session)
  (c) rest      this service, POST PNG -> PNG label map
  (d) naive     FastAPI + torch eager (pipelines/naive_torch_server.py), POST PNG -> PNG label map
(b) and (c) run once per ingress (INGRESS_ENV): Ray Serve's default Python proxy, its HAProxy ingress
(RAY_SERVE_ENABLE_HA_PROXY=1, Ray >= 2.55), and HAProxy with the replica's user code on Serve's own event loop
instead of a second thread (RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0), and Ray 2.60's throughput-optimised mode
(RAY_SERVE_THROUGHPUT_OPTIMIZED=1) twice: through Serve's proxy port, and straight at the replica's own HTTP port
(direct ingress: what HAProxy forwards to, without HAProxy), each in a fresh subprocess because the flags are read
when Serve starts; the last once more with `endoflow serve --batch-overlap` (onnxruntime off the replica's loop, two
batches at once: serving/batching.py).
Every mode is measured at each concurrency for `seconds` by closed-loop client threads with keep-alive
connections (http.client: the cheapest Python client, so the client adds as little as possible to every mode).
The overhead target is also measured paired (bare, v2 and an echo deployment in alternating rounds while the
service is up; see paired_overhead): the echo answers the same request with bytes of the same size and does no
work, so it is the floor that Serve's HTTP path and the ingress cost on this machine before any code of ours runs.
The model is an untrained default (`lite`) segmenter: latency does not depend on the weights.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.local_ray import free_port_block

Send = Callable[[Any], int]  # (per-thread state) -> HTTP status (200 = ok)
# Environment of the service process per ingress variant; Serve reads these when it starts.
INGRESS_ENV: dict[str, dict[str, str]] = {
    "default": {},
    "haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1"},
    "haproxy_same_loop": {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"},
    "throughput_optimized": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
    "throughput_optimized_replica_port": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},  # see replica_ports
    "throughput_optimized_replica_port_overlap": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
}
# Variants measured at the replica's own port, and service options a variant sets (`endoflow serve` flags).
AT_REPLICA_PORT = {"throughput_optimized_replica_port", "throughput_optimized_replica_port_overlap"}
SERVICE_OPTIONS: dict[str, dict[str, Any]] = {"throughput_optimized_replica_port_overlap": {"batch_overlap": True}}
# Direct ingress gives each replica an HTTP port from RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT up (default 30000-31000).
REPLICA_PORTS_FROM = "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"


def prepare(workdir: Path, input_size: int) -> tuple[Path, Path]:
    """Export one untrained segmenter to ONNX and save the same weights for the torch server."""
    import torch

    from training.export import export_segmenter
    from training.models.unet import Segmenter, UNetConfig

    torch.manual_seed(0)
    model = Segmenter(UNetConfig()).eval()
    onnx_path = export_segmenter(model, workdir / "bench_segmenter.onnx", input_size=input_size)
    checkpoint = workdir / "bench_segmenter.pt"
    torch.save(
        {"config": model.cfg.model_dump_json(), "state_dict": model.state_dict(), "input_size": input_size}, checkpoint
    )
    return onnx_path, checkpoint


def prepare_propagation(workdir: Path, input_size: int) -> Path:
    """The default propagation network, untrained, exported as its three graphs (speed does not need weights)."""
    import torch

    from training.models.propagation.network import PropagationConfig, PropagationNet
    from training.propagate.export import export_propagation

    torch.manual_seed(0)
    export_propagation(PropagationNet(PropagationConfig()).eval(), workdir / "propagation", input_size=input_size)
    return workdir / "propagation"


def bench_streams(port: int, size: int, frames: int, sessions: tuple[int, ...] = (1, 4)) -> list[dict]:
    """WebSocket streams: open with frame 0 + mask, then `frames` frames each; frames/s per session and in all."""
    import base64

    from websockets.sync.client import connect

    image = png_bytes(test_image(size))
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4 : size // 2, size // 4 : size // 2], mask[:, : size // 8] = 3, 1
    opening = json.dumps(
        {"frame": base64.b64encode(image).decode(), "mask": base64.b64encode(png_bytes(mask)).decode()}
    )
    results = []
    for count in sessions:
        rates: list[float] = []
        errors = [0]

        def one_stream(rates: list[float] = rates, errors: list[int] = errors) -> None:
            with connect(f"ws://127.0.0.1:{port}/v1/propagate/stream", max_size=None, open_timeout=60) as socket:
                socket.send(opening)
                json.loads(socket.recv(timeout=60))
                start = time.perf_counter()
                for _ in range(frames):
                    socket.send(image)
                    errors[0] += not isinstance(socket.recv(timeout=60), bytes)
                rates.append(frames / (time.perf_counter() - start))

        threads = [threading.Thread(target=one_stream) for _ in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        results.append(
            {
                "sessions": count,
                "frames_per_session": frames,
                "fps_per_session": round(float(np.mean(rates)), 2),
                "fps_total": round(float(np.sum(rates)), 2),
                "errors": errors[0] + count - len(rates),
            }
        )
    return results


def test_image(size: int) -> np.ndarray:
    """A smooth synthetic frame (gradients + a disc): PNG-compressible like a real one, no data needed."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    disc = ((x - 0.5) ** 2 + (y - 0.5) ** 2 < 0.1).astype(np.float32)
    rgb = np.stack([0.6 + 0.3 * x, 0.3 + 0.2 * y + 0.3 * disc, 0.3 * (1 - x)], axis=-1)
    return (rgb * 255).clip(0, 255).astype(np.uint8)


def closed_loop(make_state: Callable[[], Any], send: Send, concurrency: int, seconds: float) -> dict[str, Any]:
    """`concurrency` threads each send back-to-back for `seconds` (after a short warm-up)."""
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors = [0] * concurrency
    start_at = time.monotonic() + 0.5
    stop_at = start_at + seconds

    def worker(index: int) -> None:
        state = make_state()
        while time.monotonic() < start_at:  # warm-up: connections open, caches hot
            try:
                send(state)
            except (OSError, http.client.HTTPException):
                state = make_state()
        while time.monotonic() < stop_at:
            began = time.perf_counter()
            try:
                ok = send(state) == 200
            except (OSError, http.client.HTTPException):
                ok, state = False, make_state()
            latencies[index].append(time.perf_counter() - began)
            errors[index] += not ok

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ms = np.concatenate([np.array(x) for x in latencies]) * 1000
    if not ms.size:
        raise RuntimeError(f"no request finished in {seconds}s at concurrency {concurrency}")
    return {
        "concurrency": concurrency,
        "requests": int(ms.size),
        "errors": int(sum(errors)),
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "throughput_rps": round(ms.size / seconds, 1),
    }


def http_sender(port: int, path: str, body: bytes, headers: dict[str, str]) -> tuple[Callable[[], Any], Send]:
    def make_state() -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def send(connection: http.client.HTTPConnection) -> int:
        connection.request("POST", path, body=body, headers=headers)
        response = connection.getresponse()
        response.read()
        return response.status

    return make_state, send


def server_timing_profile(port: int, path: str, body: bytes, headers: dict[str, str], seconds: float = 2.0) -> dict:
    """Concurrency 1 for `seconds`, each answer's Server-Timing stages (serving/timing.py) kept: the median of each
    stage, of their sum (the time inside our handler) and of what the client waited beyond it (the HTTP path: the
    ingress, Serve's proxy or server, the sockets, http.client)."""
    from serving.timing import HEADER, parse_server_timing

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    client_ms: list[float] = []
    stages: list[dict[str, float]] = []
    for _ in range(5):  # connection open, caches hot
        connection.request("POST", path, body=body, headers=headers)
        connection.getresponse().read()
    stop_at = time.monotonic() + seconds
    while time.monotonic() < stop_at:
        began = time.perf_counter()
        connection.request("POST", path, body=body, headers=headers)
        response = connection.getresponse()
        response.read()
        client_ms.append((time.perf_counter() - began) * 1000)
        if response.status != 200 or response.getheader(HEADER) is None:
            raise RuntimeError(f"{path} answered {response.status} without {HEADER}")
        stages.append(parse_server_timing(response.getheader(HEADER)))
    connection.close()
    inside = [sum(s.values()) for s in stages]
    return {
        "requests": len(client_ms),
        "client_p50_ms": round(float(np.median(client_ms)), 3),
        "stages_p50_ms": {name: round(float(np.median([s.get(name, 0.0) for s in stages])), 3) for name in stages[0]},
        "handler_p50_ms": round(float(np.median(inside)), 3),
        "http_path_p50_ms": round(float(np.median(np.subtract(client_ms, inside))), 3),
    }


def v2_body(batch: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """A binary v2 request for `batch`: FP32 (N, 3, H, W) normalised, or UINT8 (N, H, W, 3) RGB pixels."""
    spec = {"name": "image", "shape": list(batch.shape), "datatype": "UINT8" if batch.dtype == np.uint8 else "FP32"}
    spec["parameters"] = {"binary_data_size": batch.nbytes}
    output = {"name": "labels", "parameters": {"binary_data": True}}
    header = json.dumps({"inputs": [spec], "outputs": [output]}).encode()
    return header + batch.tobytes(), {
        "Inference-Header-Content-Length": str(len(header)),
        "Content-Type": "application/octet-stream",
    }


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def bench_bare(model_path: Path, threads: int, levels: list[int], seconds: float) -> list[dict]:
    from serving.onnx_model import OnnxSegmenter, labels_from_logits

    model = OnnxSegmenter(model_path, intra_op_threads=threads)
    batch = model.preprocess(test_image(model.input_size[0])[None])

    def send(_: Any) -> int:
        labels_from_logits(model.logits(batch), batch.shape[2:])  # the service's own post-processing
        return 200

    return [closed_loop(lambda: None, send, c, seconds) for c in levels]


def paired_overhead(
    send_bare: Send, make_state: Callable[[], Any], send: Send, send_echo: Send, rounds: int = 8
) -> dict:
    """Bare onnxruntime, the v2 service and the echo floor at concurrency 1 in alternating one-second rounds, in one
    process while the service is up: all three see the same background load, so the p50 difference v2 - bare is the
    service's overhead and v2 - bare - echo what is left of it above Serve's own HTTP path (the sequential cells
    drift by a few ms between runs on a shared 2-core box)."""
    bare, served, echo = [], [], []
    for _ in range(rounds):
        bare.append(closed_loop(lambda: None, send_bare, 1, 1.0)["p50_ms"])
        served.append(closed_loop(make_state, send, 1, 1.0)["p50_ms"])
        echo.append(closed_loop(make_state, send_echo, 1, 1.0)["p50_ms"])
    overhead = np.subtract(served, bare)
    return {
        "rounds": rounds,
        "bare_p50_ms": round(float(np.median(bare)), 3),
        "v2_p50_ms": round(float(np.median(served)), 3),
        "echo_p50_ms": round(float(np.median(echo)), 3),
        "overhead_p50_ms": round(float(np.median(overhead)), 3),
        "overhead_above_echo_p50_ms": round(float(np.median(overhead - np.array(echo))), 3),
    }


def deploy_echo(reply_bytes: int) -> str:
    """A deployment that reads the request body and answers `reply_bytes` bytes: Serve's HTTP floor. -> its route."""
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import Response

    reply = b"\0" * reply_bytes

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Echo:
        async def __call__(self, request: Request) -> Response:
            await request.body()
            return Response(reply, media_type="application/octet-stream")

    serve.run(Echo.bind(), name="echo", route_prefix="/echo")
    return "/echo"


def replica_ports(first: int, model_name: str, count: int = 2, scan: int = 32) -> tuple[int, int]:
    """(segmentation replica's port, echo replica's port) under direct ingress, replica ports counting up from
    `first`: the segmentation replica answers /healthz with its model's name, the echo answers anything else."""
    found: dict[str, int] = {}
    for port in range(first, first + scan):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            connection.request("GET", "/healthz")
            reply = connection.getresponse()
            body = reply.read()
        except OSError:
            continue
        finally:
            connection.close()
        try:
            is_model = json.loads(body)["model"]["name"] == model_name
        except (ValueError, KeyError, TypeError):
            is_model = False
        found.setdefault("model" if is_model else "echo", port)
        if len(found) == count:
            return found["model"], found["echo"]
    raise RuntimeError(f"replica ports not found in {first}-{first + scan - 1}: {found}")


def bench_service(
    model_path: Path, ingress: str, threads: int, levels: list[int], seconds: float, propagation: Path | None = None
) -> dict:
    """Runs in its own process (see main): Serve's ingress is chosen by env vars read when Serve starts."""
    from pipelines.local_ray import free_port, local_ray
    from serving.app import run_app
    from serving.onnx_model import OnnxSegmenter, labels_from_logits

    model = OnnxSegmenter(model_path, intra_op_threads=threads)
    size = model.input_size[0]
    batch = model.preprocess(test_image(size)[None])
    port = free_port()
    with local_ray(num_cpus=max(threads, 2)):
        from ray import serve

        options = SERVICE_OPTIONS.get(ingress, {}) | ({"propagation_model": str(propagation)} if propagation else {})
        run_app(str(model_path), port=port, threads=threads, reload_interval_s=0, max_batch_size=8, **options)
        warm_state, warm = http_sender(port, "/v1/segment", png_bytes(test_image(size)), {})
        state = warm_state()
        for _ in range(5):
            warm(state)
        name = Path(model_path).stem
        results = {}
        body, headers = v2_body(batch)
        pixels = test_image(size)[None]
        pixel_body, pixel_headers = v2_body(pixels)
        # The echo answers as many bytes as the v2 labels answer: the same traffic both ways.
        probe = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        probe.request("POST", f"/v2/models/{name}/infer", body=body, headers=headers)
        echo_route = deploy_echo(len(probe.getresponse().read()))
        echo_port = port
        if ingress in AT_REPLICA_PORT:  # both replicas answer on their own ports
            port, echo_port = replica_ports(int(os.environ[REPLICA_PORTS_FROM]), name)
        results["replica_port"] = port if port != echo_port else None
        make_state, send = http_sender(port, f"/v2/models/{name}/infer", body, headers)
        results["v2"] = [closed_loop(make_state, send, c, seconds) for c in levels]
        make_pixel_state, send_pixels = http_sender(port, f"/v2/models/{name}/infer", pixel_body, pixel_headers)
        results["v2_uint8"] = [closed_loop(make_pixel_state, send_pixels, c, seconds) for c in levels]

        def send_bare(_: Any) -> int:
            labels_from_logits(model.logits(batch), batch.shape[2:])
            return 200

        def send_bare_pixels(_: Any) -> int:  # the same pixels, normalised as the server does, the same session
            labels_from_logits(model.logits(model.preprocess(pixels)), pixels.shape[1:3])
            return 200

        _, send_echo = http_sender(echo_port, echo_route, body, headers)
        results["paired"] = paired_overhead(send_bare, make_state, send, send_echo)
        _, send_pixel_echo = http_sender(echo_port, echo_route, pixel_body, pixel_headers)
        results["paired_uint8"] = paired_overhead(send_bare_pixels, make_pixel_state, send_pixels, send_pixel_echo)
        results["profile"] = {
            "v2": server_timing_profile(port, f"/v2/models/{name}/infer", body, headers),
            "v2_uint8": server_timing_profile(port, f"/v2/models/{name}/infer", pixel_body, pixel_headers),
        }
        make_state, send = http_sender(port, "/v1/segment", png_bytes(test_image(size)), {"Content-Type": "image/png"})
        results["rest"] = [closed_loop(make_state, send, c, seconds) for c in levels]
        if propagation:
            results["streams"] = bench_streams(port, size, frames=max(10, int(seconds * 5)))
        serve.shutdown()
    return results


def bench_naive(checkpoint: Path, size: int, threads: int, levels: list[int], seconds: float) -> list[dict]:
    from pipelines.local_ray import free_port

    port = free_port()
    env = os.environ | {"ENDOFLOW_NAIVE_CHECKPOINT": str(checkpoint), "ENDOFLOW_NAIVE_THREADS": str(threads)}
    command = [sys.executable, "-m", "uvicorn", "pipelines.naive_torch_server:app", "--port", str(port)]
    server = subprocess.Popen([*command, "--log-level", "warning"], env=env)
    try:
        _wait_port(port, 120)
        make_state, send = http_sender(port, "/v1/segment", png_bytes(test_image(size)), {"Content-Type": "image/png"})
        warm = make_state()
        for _ in range(10):  # torch's first calls are seconds slower (allocator, kernels): not what we measure
            send(warm)
        return [closed_loop(make_state, send, c, seconds) for c in levels]
    finally:
        server.terminate()
        server.wait(timeout=30)


def bench_serve(
    out: Path,
    *,
    seconds: float = 4.0,
    threads: int = 2,
    levels: tuple[int, ...] = (1, 8, 32),
    input_size: int = 256,
    ingresses: tuple[str, ...] = tuple(INGRESS_ENV),
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    out.parent.mkdir(parents=True, exist_ok=True)
    workdir = out.parent / "serve_bench_model"
    workdir.mkdir(exist_ok=True)
    model_path, checkpoint = prepare(workdir, input_size)
    propagation = prepare_propagation(workdir, input_size)
    report: dict[str, Any] = {
        "machine": f"{platform.node()} {os.cpu_count()} CPUs, shared with other jobs (load {os.getloadavg()[0]:.1f})",
        "model": "untrained default lite segmenter",
        "input_size": input_size,
        "threads_per_server": threads,
        "seconds_per_cell": seconds,
    }
    log("(a) bare onnxruntime")
    report["a_bare_onnxruntime"] = bench_bare(model_path, threads, list(levels), seconds)
    for ingress in ingresses:
        log(f"(b, c) service, {ingress} ingress")
        result_file = workdir / f"service_{ingress}.json"
        env = os.environ | INGRESS_ENV[ingress]
        if ingress in AT_REPLICA_PORT:
            env |= {REPLICA_PORTS_FROM: str(free_port_block(64))}  # where this variant's replicas listen
        args = ["service", str(model_path), ingress, str(threads), ",".join(map(str, levels)), str(seconds)]
        # Streams once, on the default ingress: the WebSocket path does not depend on the ingress choice here.
        args += [str(result_file), str(propagation) if ingress == ingresses[0] else ""]
        subprocess.run([sys.executable, "-m", "pipelines.bench_serve", *args], env=env, check=True)
        service = json.loads(result_file.read_text())
        report[f"b_v2_binary_{ingress}"] = service["v2"]
        report[f"b_v2_uint8_{ingress}"] = service["v2_uint8"]
        report[f"paired_bare_vs_v2_uint8_at_1_{ingress}"] = service["paired_uint8"]
        report[f"c_rest_png_{ingress}"] = service["rest"]
        report[f"paired_bare_vs_v2_at_1_{ingress}"] = service["paired"]
        report[f"profile_at_1_{ingress}"] = service["profile"]
        if "streams" in service:
            report["propagation_streams_websocket"] = service["streams"]
    log("(d) naive FastAPI + torch eager")
    report["d_naive_torch"] = bench_naive(checkpoint, input_size, threads, list(levels), seconds)
    report["summary"] = _summary(report, ingresses)
    out.write_text(json.dumps(report, indent=2))
    return report


def _summary(report: dict[str, Any], ingresses: tuple[str, ...]) -> dict[str, Any]:
    def at(key: str, concurrency: int) -> dict:
        return next(r for r in report[key] if r["concurrency"] == concurrency)

    summary: dict[str, Any] = {}
    for ingress in ingresses:
        b1, a1 = at(f"b_v2_binary_{ingress}", 1), at("a_bare_onnxruntime", 1)
        b8, d8, a8 = at(f"b_v2_binary_{ingress}", 8), at("d_naive_torch", 8), at("a_bare_onnxruntime", 8)
        paired, paired_uint8 = (
            report[f"paired_bare_vs_v2_at_1_{ingress}"],
            report[f"paired_bare_vs_v2_uint8_at_1_{ingress}"],
        )
        summary[ingress] = {
            "v2_overhead_p50_ms_at_1": round(b1["p50_ms"] - a1["p50_ms"], 3),
            "v2_overhead_p50_ms_at_1_paired": paired["overhead_p50_ms"],
            "echo_floor_p50_ms_at_1_paired": paired["echo_p50_ms"],
            "v2_overhead_above_echo_p50_ms_at_1_paired": paired["overhead_above_echo_p50_ms"],
            "v2_uint8_overhead_p50_ms_at_1_paired": paired_uint8["overhead_p50_ms"],
            "v2_uint8_echo_floor_p50_ms_at_1_paired": paired_uint8["echo_p50_ms"],
            "v2_vs_naive_throughput_at_8": round(b8["throughput_rps"] / max(d8["throughput_rps"], 1e-9), 2),
            "v2_vs_bare_throughput_at_8": round(b8["throughput_rps"] / max(a8["throughput_rps"], 1e-9), 2),
            "v2_uint8_vs_bare_throughput_at_8": round(
                at(f"b_v2_uint8_{ingress}", 8)["throughput_rps"] / max(a8["throughput_rps"], 1e-9), 2
            ),
        }
        summary[ingress]["where_the_overhead_goes_ms"] = {
            kind: overhead_breakdown(report[f"profile_at_1_{ingress}"][kind], bare)
            for kind, bare in (("v2", paired["bare_p50_ms"]), ("v2_uint8", paired_uint8["bare_p50_ms"]))
        }
    summary["errors"] = sum(r.get("errors", 0) for v in report.values() if isinstance(v, list) for r in v)
    return summary


def overhead_breakdown(profile: dict, bare_p50_ms: float) -> dict:
    """The served p50 minus bare onnxruntime's, split by the Server-Timing profile: our handler's stages other than
    onnxruntime, onnxruntime's call inside the service against the bare one (threads shared with the server), and
    the HTTP path outside our handler. The parts are medians of their own, so they add up only roughly."""
    stages = profile["stages_p50_ms"]
    ours = {name: ms for name, ms in stages.items() if name != "onnx"}
    return {
        "served_p50": profile["client_p50_ms"],
        "bare_p50": bare_p50_ms,
        "handler_stages_besides_onnx": ours,
        "onnx_in_service_minus_bare": round(stages.get("onnx", 0.0) - bare_p50_ms, 3),
        "http_path": profile["http_path_p50_ms"],
    }


def _wait_port(port: int, timeout_s: float) -> None:
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on port {port} after {timeout_s:.0f}s")


def main(argv: list[str] | None = None) -> None:
    """`python -m pipelines.bench_serve service MODEL INGRESS THREADS LEVELS SECONDS OUT [PROPAGATION]`: one service
    run, in its own process because the ingress is chosen by env vars read when Serve starts."""
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["service"])
    parser.add_argument("model", type=Path)
    parser.add_argument("ingress")
    parser.add_argument("threads", type=int)
    parser.add_argument("levels")
    parser.add_argument("seconds", type=float)
    parser.add_argument("out", type=Path)
    parser.add_argument("propagation", nargs="?", default="")
    args = parser.parse_args(argv)
    # HAProxy holds a descriptor per connection and per replica; the default soft limit can be too low.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, 16384), hard), hard))
    levels = [int(x) for x in args.levels.split(",")]
    propagation = Path(args.propagation) if args.propagation else None
    result = bench_service(args.model, args.ingress, args.threads, levels, args.seconds, propagation)
    args.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
