"""`endoflow style …`: write a sim→real translated dataset (training-free or learned), train the learned translator."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(no_args_is_help=True, help="Sim→real style transfer: translated datasets and the CUT translator.")
console = Console()

ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file")]
SetOption = Annotated[list[str] | None, typer.Option("--set", "-s", help="override, e.g. source.count=64")]


def _load(cls, path, overrides):
    from training.config import ConfigError, load_config

    try:
        return load_config(cls, path, overrides or [])
    except ConfigError as exc:
        console.print(f"[red]config error:[/red] {exc}")
        raise typer.Exit(2) from exc


@app.command()
def apply(
    config: ConfigOption = None,
    set_: SetOption = None,
    method: Annotated[str | None, typer.Option(help="fda | lab | histogram | translator | adain")] = None,
    out: Annotated[str | None, typer.Option(help="output directory or s3:// prefix")] = None,
    translator: Annotated[Path | None, typer.Option(help="generator file (method translator)")] = None,
    adain_weights: Annotated[Path | None, typer.Option(help="local AdaIN weights (method adain)")] = None,
) -> None:
    """Translate the source frames and write images + the unchanged simulator labels (folder layout)."""
    from pipelines.style_flow import StyleApplyConfig, apply_style_dataset
    from training.data.folders import DataError

    shortcuts = {"method": method, "out": out, "translator": translator, "adain.weights": adain_weights}
    overrides = (set_ or []) + [f"{key}={value}" for key, value in shortcuts.items() if value is not None]
    cfg = _load(StyleApplyConfig, config, overrides)
    try:
        summary = apply_style_dataset(cfg, progress=lambda line: console.print(line, highlight=False))
    except (DataError, FileNotFoundError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    console.print(f"wrote {summary['frames']} {summary['method']}-translated frames with labels to {summary['out']}")


@app.command()
def train(
    config: ConfigOption = None,
    set_: SetOption = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: $RAY_ADDRESS or local)")] = None,
    fresh: Annotated[bool, typer.Option(help="start over instead of resuming a run of the same name")] = False,
) -> None:
    """Train the CUT translator (Ray Train; resumes a run of the same name) and export its generator."""
    from pipelines.local_ray import local_ray
    from pipelines.style_flow import train_translator
    from training.style.translator_config import TranslatorJobConfig

    cfg = _load(TranslatorJobConfig, config, set_)
    try:
        with local_ray(address=address):
            path, metrics, run_id = train_translator(cfg, fresh=fresh)
    except (FileNotFoundError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    console.print(f"generator: {path} (epoch {metrics.get('epoch')}), MLflow run {run_id} (sample grids in samples/)")
