"""One typed config object per job: pydantic models loaded from YAML and overridden from the CLI.

Overrides are `dotted.key=value` strings; the value is parsed as YAML, so `train.epochs=3`, `style.method=fda` and
`source.sequences=[seq1,seq2]` all work. Unknown keys and wrong types fail with the offending field named.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

ConfigT = TypeVar("ConfigT", bound=BaseModel)


class ConfigError(ValueError):
    pass


def apply_override(tree: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key.path=value")
    dotted, raw = override.split("=", 1)
    keys = dotted.strip().split(".")
    node = tree
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {key!r} is not a section")
        node = child
    node[keys[-1]] = yaml.safe_load(raw) if raw.strip() else None


def load_config(cls: type[ConfigT], path: str | Path | None = None, overrides: list[str] | None = None) -> ConfigT:
    """Defaults of `cls`, then the YAML file at `path`, then each override in order."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level, got {type(loaded).__name__}")
        tree = loaded
    for override in overrides or []:
        apply_override(tree, override)
    try:
        return cls.model_validate(tree)
    except ValidationError as exc:
        where = f" (from {path})" if path else ""
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid {cls.__name__}{where}: {problems}") from exc


def to_yaml(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


class StrictModel(BaseModel):
    """Base for config sections: unknown keys are errors, not silently ignored typos."""

    model_config = {"extra": "forbid"}


def absolute(path: str | None) -> str | None:
    """A local path made absolute (Ray Tune trials and Train workers run in their own working directory); refs
    (models:/..., s3://...) unchanged."""
    if path is None or "://" in path or path.startswith("models:/"):
        return path
    return os.path.abspath(os.path.expanduser(path))


# The checked-in recipes (configs/*.yaml at the repository root): the one place that says where they are. The
# package is installed editable from the repository (pyproject.toml), so the root is this file's parent's parent.
CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"


def configs_dir() -> Path:
    """configs/ of the checkout, or $ENDOFLOW_CONFIGS where the package is installed without one (the train image)."""
    return Path(os.environ["ENDOFLOW_CONFIGS"]) if os.environ.get("ENDOFLOW_CONFIGS") else CONFIGS_DIR


def recipe_path(name: str) -> Path:
    """configs/<name>, failing with the file named when it is missing (e.g. a non-editable install)."""
    path = configs_dir() / name
    if not path.is_file():
        raise ConfigError(
            f"recipe {name} not found: expected {path} (configs/ at the repository root, or set ENDOFLOW_CONFIGS)"
        )
    return path


def load_recipe(cls: type[ConfigT], name: str, overrides: list[str] | None = None) -> ConfigT:
    """The checked-in recipe configs/<name> as `cls`, then each override in order."""
    return load_config(cls, recipe_path(name), overrides)
