"""The `endoflow` command line: thin wrappers that load a typed config and call a pipeline.

One verb scheme, a noun then a verb: `segment train`, `adapt train`, `style train|apply`,
`propagate train|run|evaluate|pseudo-label|simulate-ct`, `bench segment|adapt|serve|propagate`; plus `serve`, `sweep`,
`demo` and `evaluate`. The older spellings (`train`, `adapt -c ...`, `propagate bench`) still work, hidden from
--help, and say on stderr what to type instead.
"""

from __future__ import annotations

import copy
import functools
import inspect
import tempfile
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from pipelines.patient_cli import app as patient_app
from pipelines.propagate_cli import app as propagate_app
from pipelines.style_cli import app as style_app

app = typer.Typer(add_completion=False, no_args_is_help=True, help="EndoFlow: sim-to-real endoscopy segmentation.")
segment_app = typer.Typer(no_args_is_help=True, help="The segmentation job (sim source, optional FDA).")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that write JSON reports.")
console = Console()

ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file")]
SetOption = Annotated[list[str] | None, typer.Option("--set", "-s", help="override, e.g. compute.epochs=3")]
# The options every training command shares.
EvalDataOption = Annotated[Path | None, typer.Option(help="YAML DataSpec of labelled frames to score")]
RegisterOption = Annotated[str | None, typer.Option(help="register the ONNX model as NAME or NAME@ALIAS")]
AddressOption = Annotated[str | None, typer.Option(help="Ray cluster address (default: $RAY_ADDRESS or local)")]
FreshOption = Annotated[bool, typer.Option(help="start over instead of resuming a run of the same name")]
WorkersOption = Annotated[int | None, typer.Option(help="Ray Train workers (= --set compute.workers=N)")]
GpusOption = Annotated[
    float | None, typer.Option(help="> 0: CUDA with NCCL and AMP (= --set compute.gpus_per_worker=G)")
]


@app.command()
def demo(
    config: ConfigOption = None,
    set_: SetOption = None,
    clean: Annotated[bool, typer.Option(help="delete runs/demo first")] = False,
) -> None:
    """Simulate → train (source-only, FDA) → evaluate → export → register → serve → query."""
    from pipelines.demo import DemoConfig, run_demo
    from pipelines.demo import clean as clean_runs
    from training.config import load_config

    cfg = _load(DemoConfig, config, set_, load_config)
    if clean:
        clean_runs(cfg)
    run_demo(cfg, console)


@segment_app.command("train")
def segment_train_command(
    config: ConfigOption = None,
    set_: SetOption = None,
    eval_data: EvalDataOption = None,
    register: RegisterOption = None,
    address: AddressOption = None,
    fresh: FreshOption = False,
    workers: WorkersOption = None,
    gpus_per_worker: GpusOption = None,
) -> None:
    """Train the segmentation job (resumes a stopped run of the same name), export ONNX, optionally register."""
    from pipelines import segment_flow
    from training.segment.config import SegmentJobConfig

    flow = segment_flow.train_and_export
    _train_export(SegmentJobConfig, flow, config, set_, eval_data, register, address, fresh, workers, gpus_per_worker)


def adapt_train_command(
    config: ConfigOption = None,
    set_: SetOption = None,
    eval_data: EvalDataOption = None,
    register: RegisterOption = None,
    address: AddressOption = None,
    fresh: FreshOption = False,
    workers: WorkersOption = None,
    gpus_per_worker: GpusOption = None,
    extra_labelled: Annotated[
        str | None, typer.Option(help="labelled real frames of other patients (folder or vocalfolds root, or s3://)")
    ] = None,
) -> None:
    """Train the adaptation job (style + IRB + pseudo-labels [+ adversarial]), export ONNX, optionally register."""
    from pipelines import adapt_flow
    from training.adapt.config import AdaptJobConfig, extra_labelled_override

    if extra_labelled:
        set_ = (set_ or []) + [extra_labelled_override(extra_labelled)]
    flow = adapt_flow.train_and_export
    _train_export(AdaptJobConfig, flow, config, set_, eval_data, register, address, fresh, workers, gpus_per_worker)


@app.command()
def evaluate(
    model: Annotated[str, typer.Option(help="ONNX path or models:/name@alias")],
    data: Annotated[str, typer.Option(help="dataset root: a directory or s3:// prefix")],
    layout: Annotated[str, typer.Option(help="folder (images/ masks/ classes.json) or vocalfolds")] = "folder",
    sequences: Annotated[list[str] | None, typer.Option("--sequence", help="vocalfolds sequence, repeatable")] = None,
    out: Path = Path("runs/evaluate/report.json"),
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow registry for models:/ refs")] = None,
) -> None:
    """Per-class Dice/IoU of an exported model on labelled frames, with overlay PNGs."""
    from pipelines.evaluate import evaluate_onnx
    from training.data.folders import DataError
    from training.tracking import default_tracking_uri

    try:
        report = evaluate_onnx(model, data, layout, out, sequences, tracking_uri or default_tracking_uri())
    except (DataError, FileNotFoundError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    console.print(
        f"{report['data']['frames']} frames: mean Dice {report['mean_dice']:.4f}, mean IoU {report['mean_iou']:.4f}"
    )
    console.print(f"report: {out} · overlays: {report['overlays']}")


@app.command()
def sweep(
    config: ConfigOption = None,
    set_: SetOption = None,
    address: AddressOption = None,
) -> None:
    """Ray Tune sweep over a job's config: trials as nested MLflow runs, then best_config.yaml, a plot, a summary."""
    from pipelines.sweep_flow import sweep_and_log
    from training.config import ConfigError, load_config
    from training.tune import SweepConfig

    cfg = _load(SweepConfig, config, set_, load_config)
    try:
        result, out_dir = sweep_and_log(cfg, address=address)
    except ConfigError as exc:
        console.print(f"[red]config error:[/red] {exc}")
        raise typer.Exit(2) from exc
    console.print(f"best {cfg.metric} {result.best_metric:.4f} with {result.best_params}")
    console.print(f"{len(result.trials)} trials · {out_dir}/best_config.yaml · summary.json · sweep.png")


@app.command()
def serve(
    model: Annotated[str, typer.Option(help="ONNX path or models:/name@alias")],
    propagation_model: Annotated[
        str | None,
        typer.Option(help="propagation graphs: their folder or models:/NAME@ALIAS (`propagate train --register`)"),
    ] = None,
    port: int = 8000,
    host: str = "127.0.0.1",
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: local)")] = None,
    tracking_uri: Annotated[
        str | None, typer.Option(help="MLflow registry for models:/ refs (default: $MLFLOW_TRACKING_URI or runs/)")
    ] = None,
    replicas: Annotated[int, typer.Option(help="replicas (ignored with --max-replicas)")] = 1,
    max_replicas: Annotated[int | None, typer.Option(help="> replicas: autoscale between --replicas and this")] = None,
    threads: Annotated[int, typer.Option(help="onnxruntime intra-op threads (= Ray CPUs) per replica")] = 1,
    providers: Annotated[str, typer.Option(help="'auto' or comma-separated onnxruntime providers, in order")] = "auto",
    max_batch_size: Annotated[int, typer.Option(help="dynamic batching: most requests per onnxruntime call")] = 8,
    batch_wait_ms: Annotated[float, typer.Option(help="dynamic batching: wait for a fuller batch")] = 0.0,
    batch_overlap: Annotated[
        bool, typer.Option(help="onnxruntime in a worker thread, two batches at once (experiment 023)")
    ] = False,
    reload_interval: Annotated[float, typer.Option(help="seconds between re-resolving the model (0: never)")] = 60.0,
    api_token: Annotated[
        str | None, typer.Option(envvar="ENDOFLOW_API_TOKEN", help="bearer token required on API routes")
    ] = None,
    haproxy: Annotated[
        bool, typer.Option(help="Ray Serve's HAProxy ingress (measured faster: runs/bench/serve.json); local Ray only")
    ] = True,
    access_log: Annotated[bool, typer.Option(help="Serve's per-request access log (/metrics counts anyway)")] = False,
) -> None:
    """Serve a segmentation model (and propagation graphs) over HTTP in the foreground; Ctrl-C stops cleanly."""
    import os
    import time

    from pipelines.ingress import PortTaken, claim_ports, configure_haproxy
    from pipelines.local_ray import local_ray
    from serving.app import run_app
    from training.tracking import default_tracking_uri

    local = not (address or os.environ.get("RAY_ADDRESS"))
    haproxy = haproxy and local
    if local:  # a taken port fails here, in a second, rather than as HAProxy's traceback once Ray is up
        try:
            claim_ports(host, port, haproxy)
        except PortTaken as exc:
            console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2) from exc
    scratch = tempfile.TemporaryDirectory(prefix="endoflow-serve-")
    if haproxy:  # read by Serve's processes when they start, so it has to be set before Ray is
        configure_haproxy(port, Path(scratch.name))
    scaling = {"num_replicas": replicas}
    if max_replicas and max_replicas > replicas:
        scaling = {
            "autoscaling": {"min_replicas": replicas, "max_replicas": max_replicas, "target_ongoing_requests": 4}
        }
    with scratch, local_ray(address=address):
        run_app(
            model,
            port=port,
            host=host,
            blocking=False,
            tracking_uri=tracking_uri or default_tracking_uri(),
            threads=threads,
            providers=providers,
            max_batch_size=max_batch_size,
            batch_wait_timeout_s=batch_wait_ms / 1000,
            batch_overlap=batch_overlap,
            reload_interval_s=reload_interval,
            api_token=api_token or "",
            access_log=access_log,
            propagation_model=propagation_model,
            **scaling,
        )
        with_propagation = f" and {propagation_model} (/v1/propagate/...)" if propagation_model else ""
        console.print(
            f"serving {model}{with_propagation} on http://{host}:{port} (page /, REST /v1/segment, v2 /v2/models/..., "
            f"/metrics, /docs){' with bearer auth' if api_token else ''}; Ctrl-C stops"
        )
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            console.print("stopping")


app.add_typer(segment_app, name="segment")
app.add_typer(bench_app, name="bench")
app.add_typer(propagate_app, name="propagate")
app.add_typer(style_app, name="style")
app.add_typer(patient_app, name="patient")


@bench_app.command("segment")
def bench_segment(
    out: Path = Path("runs/bench/segment.json"),
    real_data: Annotated[Path | None, typer.Option(help="vocalfolds root")] = Path("../shared/data/vocalfolds"),
    epochs: int = 30,
    models: Annotated[
        str, typer.Option(help="comma-separated: default (scratch), lite0_imagenet, plain_unet (≈ 35 min here)")
    ] = "default,lite0_imagenet,plain_unet",
) -> None:
    """Scratch and ImageNet-pretrained segmenters and a plain U-Net: onnxruntime fps at 256×256 and mean Dice with
    the same data and budget."""
    import json

    from pipelines.bench import bench_segment as run_bench

    try:
        report = run_bench(out, real_data, epochs=epochs, models=[m.strip() for m in models.split(",") if m.strip()])
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    console.print_json(json.dumps(report))


@bench_app.command("serve")
def bench_serve_command(
    out: Path = Path("runs/bench/serve.json"),
    seconds: Annotated[float, typer.Option(help="measured seconds per mode and concurrency")] = 4.0,
    threads: Annotated[int, typer.Option(help="inference threads of every server")] = 2,
    variants: Annotated[
        str | None, typer.Option(help="comma-separated service variants (default: all, pipelines/bench_serve.py)")
    ] = None,
) -> None:
    """Serving latency/throughput: bare onnxruntime vs this service (v2, REST; each ingress variant) vs naive torch."""
    import json

    from pipelines.bench_serve import INGRESS_ENV, bench_serve

    chosen = tuple(v.strip() for v in variants.split(",") if v.strip()) if variants else tuple(INGRESS_ENV)
    if unknown := [v for v in chosen if v not in INGRESS_ENV]:
        console.print(f"[red]error:[/red] --variants: unknown {unknown}; known: {', '.join(INGRESS_ENV)}")
        raise typer.Exit(2)
    report = bench_serve(out, seconds=seconds, threads=threads, ingresses=chosen, log=console.print)
    console.print_json(json.dumps(report["summary"]))


@bench_app.command("adapt")
def bench_adapt(
    out: Path = Path("runs/bench/adapt.json"),
    real_data: Annotated[str | None, typer.Option(help="real target root (default: embedded real-like sim)")] = None,
    real_layout: Annotated[str, typer.Option(help="layout of --real-data")] = "vocalfolds",
    train_sequences: Annotated[str, typer.Option(help="comma-separated: unlabelled target (oracle: labelled)")] = (
        "seq1,seq2,seq3"
    ),
    eval_sequences: Annotated[str, typer.Option(help="comma-separated: scored, never trained on")] = "seq4",
    config: ConfigOption = None,
    set_: SetOption = None,
) -> None:
    """Adaptation ladder: source-only → FDA → learned ST → IRB → IRB + pseudo-labels → oracle; JSON report."""
    import json

    from pipelines.bench_adapt import BenchAdaptConfig, run_bench
    from training.config import load_config

    options = {
        "real_data": real_data,
        "real_layout": real_layout,
        "train_sequences": f"[{train_sequences}]",
        "eval_sequences": f"[{eval_sequences}]",
    }
    overrides = [f"{key}={value}" for key, value in options.items() if value is not None] + (set_ or [])
    cfg = _load(BenchAdaptConfig, config, overrides, load_config)
    try:
        report = run_bench(cfg, out)
    except (FileNotFoundError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    console.print_json(json.dumps(report["summary"]))


@bench_app.command("propagate")
def bench_propagate_command(
    out: Path = Path("runs/bench/propagate.json"),
    model: Annotated[
        Path | None,
        typer.Option(
            help="trained checkpoint .pt (default: runs/artifacts/propagate-bench.pt, trained first when missing: "
            "about an hour on 2 cores)"
        ),
    ] = None,
    real_data: Annotated[Path | None, typer.Option(help="vocalfolds root")] = Path("../shared/data/vocalfolds"),
    ensemble: Annotated[
        int,
        typer.Option(
            min=1, help="also score an ensemble of this many bench networks (seeds 0..N-1, each trained when missing)"
        ),
    ] = 1,
    key_encoder: Annotated[
        str, typer.Option(help="scratch, or lite0-imagenet: train and score the bench with the ImageNet key encoder")
    ] = "scratch",
) -> None:
    """J&F on simulator sequences and vocalfolds, Dice and NSD on simulator CT volumes, frames/s at 256×256 for torch
    and onnxruntime (2 threads)."""
    import json

    from pipelines.bench_propagate import bench_propagate

    if key_encoder not in ("scratch", "lite0-imagenet"):
        console.print(f"[red]error:[/red] --key-encoder {key_encoder!r}: expected scratch or lite0-imagenet")
        raise typer.Exit(2)
    try:
        report = bench_propagate(out, model, real_data, ensemble=ensemble, key_encoder=key_encoder)
    except ValueError as exc:  # ConfigError: its training run exists with another model; or an unscorable ensemble
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    console.print_json(json.dumps({k: v for k, v in report.items() if k != "real_sequences"}))


@bench_app.command("patient")
def bench_patient_command(
    out: Path = Path("runs/bench/patient.json"),
    propagation_model: Annotated[
        str, typer.Option(help="trained propagation model (`make bench-propagate` trains the default)")
    ] = "runs/artifacts/propagate-bench.pt",
    real_data: Annotated[Path, typer.Option(help="vocalfolds root")] = Path("../shared/data/vocalfolds"),
    config: ConfigOption = None,
    set_: SetOption = None,
) -> None:
    """A new patient from K labelled frames: K alone, K + propagated pseudo-labels, zero labels, all labels; Dice on
    a sequence never trained on, and wall time (pipelines/bench_patient.py)."""
    import json

    from pipelines.bench_patient import BenchPatientConfig, run_bench
    from training.config import load_config

    options = [f"propagation_model={propagation_model}", f"real_data={real_data}"]
    cfg = _load(BenchPatientConfig, config, options + (set_ or []), load_config)
    try:
        report = run_bench(cfg, out, progress=console.print)
    except (FileNotFoundError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    console.print_json(json.dumps(report["summary"]))


def _train_export(cls, train_and_export, config, set_, eval_data, register, address, fresh, workers, gpus_per_worker):
    """What `segment train` and `adapt train` share: config + overrides, the job's flow (Ray Train run, scoring, ONNX
    export, registry) on a local or given Ray cluster, the artifacts copied to an s3:// runs_dir."""
    from pipelines.local_ray import local_ray
    from training.config import ConfigError, load_config
    from training.data import storage
    from training.data.sources import DataSpec

    shortcuts = {"compute.workers": workers, "compute.gpus_per_worker": gpus_per_worker}
    set_ = (set_ or []) + [f"{key}={value}" for key, value in shortcuts.items() if value is not None]
    cfg = _load(cls, config, set_, load_config)
    eval_spec = _load(DataSpec, eval_data, [], load_config) if eval_data else cfg.val
    register_as = None
    if register:
        name, _, alias = register.partition("@")
        register_as = (name, alias or None)
    artifacts_uri = storage.join(cfg.runs_dir, "artifacts")
    with local_ray(num_cpus=None, address=address), tempfile.TemporaryDirectory(prefix="endoflow-export-") as scratch:
        # ONNX export and overlays need a local folder; an s3:// runs_dir gets a copy of it afterwards.
        out_dir = Path(scratch) if storage.is_s3(artifacts_uri) else Path(artifacts_uri)
        try:
            result = train_and_export(cfg, eval_spec, out_dir, register_as, fresh=fresh)
        except ConfigError as exc:  # e.g. a run of this name exists with another model
            console.print(f"[red]config error:[/red] {exc}")
            raise typer.Exit(2) from exc
        onnx_location = str(result.onnx_path)
        if storage.is_s3(artifacts_uri):
            for file in sorted(p for p in out_dir.rglob("*") if p.is_file()):
                storage.write_bytes(storage.join(artifacts_uri, *file.relative_to(out_dir).parts), file.read_bytes())
            onnx_location = storage.join(artifacts_uri, *Path(result.onnx_path).relative_to(out_dir).parts)
    console.print(f"ONNX: {onnx_location} (parity max |Δ| {result.parity_max_abs_diff:.1e}), run {result.run_id}")
    if result.summary:
        console.print(f"mean Dice {result.summary['mean_dice']:.4f}, mean IoU {result.summary['mean_iou']:.4f}")
    if result.registered_version:
        console.print(f"registered {register} version {result.registered_version}")


def _load(cls, path, overrides, load_config):
    from training.config import ConfigError

    try:
        return load_config(cls, path, overrides or [])
    except ConfigError as exc:
        console.print(f"[red]config error:[/red] {exc}")
        raise typer.Exit(2) from exc


# --- the older spellings, kept as hidden aliases --------------------------------------------------------------------


def _deprecated(old: str, new: str, command: Callable[..., None]) -> Callable[..., None]:
    """`command` under its old name: the same options, and a one-line notice on stderr (stdout stays the report)."""

    @functools.wraps(command)
    def alias(*args, **kwargs) -> None:
        typer.echo(f"`endoflow {old}` is deprecated: use `endoflow {new}`", err=True)
        command(*args, **kwargs)

    return alias


def _with_hidden_options(command: Callable[..., None]) -> inspect.Signature:
    """`command`'s signature with a `ctx` first and every option hidden from --help, for a group callback that
    still accepts the options of its old single command."""
    hints = typing.get_type_hints(command, include_extras=True)
    parameters = [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)]
    for name, parameter in inspect.signature(command).parameters.items():
        annotation = hints[name]
        if typing.get_origin(annotation) is Annotated:
            base, *extras = typing.get_args(annotation)
            extras = [copy.copy(extra) for extra in extras]
            for extra in extras:
                if isinstance(extra, typer.models.OptionInfo):
                    extra.hidden = True
            annotation = Annotated[(base, *extras)]
        parameters.append(parameter.replace(annotation=annotation))
    return inspect.Signature(parameters, return_annotation=None)


def _adapt_group(ctx: typer.Context, **options) -> None:
    """The adaptation job (style + IRB + pseudo-labels [+ adversarial]): `endoflow adapt train`."""
    if ctx.invoked_subcommand is None:  # `endoflow adapt -c ...`, the old single command
        _deprecated("adapt", "adapt train", adapt_train_command)(**options)


_adapt_group.__signature__ = _with_hidden_options(adapt_train_command)
adapt_app = typer.Typer(no_args_is_help=True)
adapt_app.callback(invoke_without_command=True)(_adapt_group)
adapt_app.command("train")(adapt_train_command)
app.add_typer(adapt_app, name="adapt")
app.command("train", hidden=True)(_deprecated("train", "segment train", segment_train_command))
propagate_app.command("bench", hidden=True)(_deprecated("propagate bench", "bench propagate", bench_propagate_command))


if __name__ == "__main__":
    app()
