"""Entrypoint of the serving image, which holds `serving/` and this file only (no torch, no CLI).

Two ways in:
  * RayService (and `serve run`): `import_path: serve_entry:app_builder` with `args:` {model, threads,
    providers, max_body_bytes, max_side, limits, cache_dir, autoscaling, max_batch_size, batch_wait_timeout_s,
    reload_interval_s, propagation_model, ...} (OPTIONS below; `propagation_model` falls back to
    ENDOFLOW_PROPAGATION_MODEL, like `model` to ENDOFLOW_MODEL). The bearer token is never an arg: each replica reads
    ENDOFLOW_API_TOKEN from its environment (the RayService wires the Secret in). Ray Serve's import_path takes
    a bound Application or a builder with exactly one parameter, the args dict; `serving.app.build_app` takes
    the model reference plus keywords, so this adapts it without touching the app.
  * `docker run IMAGE --model models:/endoflow-segmenter@champion [--propagation-model models:/NAME@ALIAS]`: a
    private single-node Ray and the app on 0.0.0.0:8000 until SIGTERM (docker stop), which shuts Serve down cleanly.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import sys
from typing import Any

from ray.serve import Application

from serving.app import build_app, run_app

# Keyword options build_app accepts plus those it hands to SegmentationService (not api_token: see above).
OPTIONS = {
    "num_replicas",
    "threads",
    "autoscaling",
    "max_ongoing_requests",
    "providers",
    "limits",
    "max_body_bytes",
    "max_side",
    "cache_dir",
    "tracking_uri",
    "max_batch_size",
    "batch_wait_timeout_s",
    "batch_overlap",
    "reload_interval_s",
    "propagation_model",
    "session_idle_timeout_s",
}


def app_builder(args: dict[str, Any]) -> Application:
    """Ray Serve application builder: `args` comes from the `args:` of the Serve config."""
    options = dict(args)
    model = options.pop("model", None) or os.environ.get("ENDOFLOW_MODEL")
    if not model:
        raise ValueError("no model: set args.model in the Serve config or ENDOFLOW_MODEL")
    if propagation := options.get("propagation_model") or os.environ.get("ENDOFLOW_PROPAGATION_MODEL"):
        options["propagation_model"] = propagation
    unknown = sorted(set(options) - OPTIONS)
    if unknown:
        raise ValueError(f"unknown serving args {unknown}; expected some of {sorted(OPTIONS)}")
    if isinstance(options.get("providers"), list):
        options["providers"] = tuple(options["providers"])
    return build_app(model, **options)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve an EndoFlow ONNX segmenter with Ray Serve.")
    parser.add_argument("--model", default=os.environ.get("ENDOFLOW_MODEL"), help="ONNX path or models:/name@alias")
    parser.add_argument(
        "--propagation-model",
        default=os.environ.get("ENDOFLOW_PROPAGATION_MODEL"),
        help="propagation graphs: their folder or models:/NAME@ALIAS (default: none, /v1/propagate answers 404)",
    )
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads (and Ray CPUs) per replica")
    parser.add_argument("--providers", default="auto", help="'auto' or comma-separated, in priority order")
    args = parser.parse_args(argv)
    if not args.model:
        parser.error("--model (or ENDOFLOW_MODEL) is required")

    import ray

    # Ray 2.60 authenticates with a token; a private in-memory one keeps a read-only $HOME untouched.
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    ray.init(include_dashboard=False, logging_level="WARNING")
    signal.signal(signal.SIGTERM, _interrupt)  # docker stop sends SIGTERM; run_app stops Serve on interrupt
    try:
        run_app(
            args.model,
            host=args.host,
            port=args.port,
            blocking=True,
            threads=args.threads,
            providers=args.providers,
            propagation_model=args.propagation_model,
        )
    finally:
        ray.shutdown()
    return 0


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
