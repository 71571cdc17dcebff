"""Finding the three propagation graphs of one export (training/propagate/export.py's contract), torch-free, for
serving and for training's tools alike.

A reference is models:/NAME@ALIAS or models:/NAME/VERSION (the registered NAME-encode_key, NAME-encode_value and
NAME-segment at that alias or version, as `endoflow propagate train --register NAME` registers them), or a path:
one of the graphs, or their directory, whose siblings `endoflow.graphs` names.

One rule refuses graphs from two exports: the contract gives the three files identical metadata except
`endoflow.graph`, so any other difference (the training run, the memory rules, the model config...) is a mix, e.g.
caught while a registry's three aliases were being moved one after the other.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from serving.resolve import ResolvedModel, resolve_model

GRAPHS = ("encode_key", "encode_value", "segment")
_REGISTRY_REF = re.compile(r"^models:/(?P<name>[^/@]+)(?P<tail>@[^/@]+|/[^/@]+)$")


def graph_metadata(path: str | Path) -> dict[str, str]:
    """A graph's `metadata_props` (the header only: external weights are not read)."""
    import onnx  # only where graphs are found, not on every import of serving

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def resolve_graphs(ref: str, cache_dir: str | None = None, tracking_uri: str | None = None) -> dict[str, ResolvedModel]:
    """The three graphs `ref` names, each with its sha256, checked to be propagation graphs of one export."""
    graphs = _registered(ref, cache_dir, tracking_uri) if ref.startswith("models:/") else _on_disk(Path(ref))
    props = {g: graph_metadata(graphs[g].path) for g in GRAPHS}
    for graph in GRAPHS:
        task, named = props[graph].get("endoflow.task"), props[graph].get("endoflow.graph")
        if (task, named) != ("propagation", graph):
            raise ValueError(
                f"{graphs[graph].ref}: endoflow.task {task!r}, endoflow.graph {named!r}; "
                f"expected 'propagation' and {graph!r}"
            )
    check_one_export(props, graphs)
    return graphs


def check_one_export(props: dict[str, dict[str, str]], graphs: dict[str, ResolvedModel]) -> None:
    """Refuse graphs whose metadata differ in anything but `endoflow.graph` (graphs of two exports)."""
    reference = {k: v for k, v in props["segment"].items() if k != "endoflow.graph"}
    for graph in ("encode_key", "encode_value"):
        other = {k: v for k, v in props[graph].items() if k != "endoflow.graph"}
        if differing := sorted(k for k in reference.keys() | other.keys() if reference.get(k) != other.get(k)):
            runs = " from different training runs" if "endoflow.source_run_id" in differing else ""
            raise ValueError(
                f"{graphs[graph].ref} and {graphs['segment'].ref} are not graphs of one export{runs} "
                f"(metadata {differing} differ); the three graphs must come from the same export"
            )


def _registered(ref: str, cache_dir: str | None, tracking_uri: str | None) -> dict[str, ResolvedModel]:
    match = _REGISTRY_REF.match(ref)
    if not match:
        raise ValueError(f"{ref!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    graphs = {}
    for graph in GRAPHS:
        graph_ref = f"models:/{match['name']}-{graph}{match['tail']}"
        try:
            graphs[graph] = resolve_model(graph_ref, cache_dir, tracking_uri)
        except (FileNotFoundError, ValueError) as err:  # an unknown alias is a ValueError in resolve_model
            raise FileNotFoundError(
                f"{ref}: registered graph missing: {err}; expected the three graphs "
                f"{match['name']}-{{{','.join(GRAPHS)}}} that `propagate train --register` registers"
            ) from err
    return graphs


def _on_disk(path: Path) -> dict[str, ResolvedModel]:
    path = path.expanduser()
    if path.is_dir():
        found = sorted(path.glob("*.segment.onnx"))
        if not found:
            raise FileNotFoundError(f"{path}: no *.segment.onnx; expected the three propagation graphs")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; expected a propagation ONNX graph")
    props = graph_metadata(path)
    if props.get("endoflow.task") != "propagation" or "endoflow.graphs" not in props:
        raise ValueError(f"{path}: not a propagation graph (endoflow.task = {props.get('endoflow.task')!r})")
    files = json.loads(props["endoflow.graphs"])
    paths = {g: path.parent / files[g] for g in GRAPHS}
    if missing := [str(p) for p in paths.values() if not p.is_file()]:
        raise FileNotFoundError(f"{path}: sibling graph(s) missing: {', '.join(missing)}")
    return {g: resolve_model(paths[g]) for g in GRAPHS}
