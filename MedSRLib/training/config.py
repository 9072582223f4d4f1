"""Recipe configs: YAML or JSON files, defaults, `--set key.path=value` overrides, data root.

Relative data paths resolve against `data.root`; a relative root resolves against the current
directory, and the environment variable MEDSR_DATA_ROOT (or `--data-root`) overrides it.
The recipes shipped with MedSR are in `MedSRLib/training/configs/` (tiny CI variants in
`configs/ci/`).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "scale": 2,
    "model_config": {},
    "degradation": [{"type": "bicubic"}],
    "loss": [{"type": "l1", "weight": 1.0}],
    "optimizer": {"type": "adam", "lr": 1e-4, "betas": [0.9, 0.999], "weight_decay": 0.0},
    "scheduler": None,
    "data": {
        "root": "../shared/data", "sources": [], "modalities": None, "slice_axes": [0], "patch_size": 96,
        "patches_per_volume": 4, "foreground_threshold": 0.1, "foreground_probability": 0.9,
        "flips": True, "rot90": True, "cache": "memory", "num_workers": 0,
        "validation_slices": {"slices_per_volume": 3, "max_size": 192},
    },
    "train": {"steps": 1000, "batch_size": 16, "precision": "fp32", "device": "auto",
              "log_every": 10, "val_every": 500, "checkpoint_every": 500, "threads": None},
    "output": {"dir": None, "export": "best", "export_dtype": "float32"},
}


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(dict(base))
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def find_config(name_or_path: str | Path) -> Path:
    """A config path, or the name of a shipped recipe ("edsr_baseline_x2", "ci/srcnn")."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / f"{name_or_path}.yaml", CONFIG_DIR / str(name_or_path)):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"config {name_or_path!r} is neither a file nor a recipe in {CONFIG_DIR}")


def apply_override(config: dict[str, Any], assignment: str) -> None:
    """Apply "a.b.c=value" (value parsed as YAML) to `config` in place."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ValueError(f"override must look like key.path=value, got {assignment!r}")
    node = config
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = yaml.safe_load(raw)


def _read_recipe(name_or_path: str | Path, chain: tuple[Path, ...] = ()) -> tuple[Path, dict[str, Any]]:
    """The recipe's mapping, merged over the recipe it names in `extends` (recursively; lists such
    as `data.sources` or `loss` are replaced, not appended)."""
    path = find_config(name_or_path)
    if path in chain:
        raise ValueError(f"{path}: 'extends' loops back to itself")
    text = path.read_text()
    raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(raw, Mapping):
        raise ValueError(f"{path}: a config is a mapping")
    raw = dict(raw)
    parent = raw.pop("extends", None)
    if parent is None:
        return path, raw
    _, base = _read_recipe(parent, chain + (path,))
    base.pop("name", None)
    return path, _merge_recipe(base, raw)


def _merge_recipe(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """deep_merge, except that a mapping naming another `type` (e.g. optimizer sgd -> adam)
    replaces the parent's instead of inheriting its other keys."""
    merged = copy.deepcopy(dict(base))
    for key, value in update.items():
        old = merged.get(key)
        if isinstance(value, Mapping) and isinstance(old, Mapping) and old.get("type", value.get("type")) == value.get("type", old.get("type")):
            merged[key] = _merge_recipe(old, value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_config(name_or_path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read a recipe (YAML or JSON; `extends: other_recipe` merges it over another), fill
    defaults, apply overrides."""
    path, raw = _read_recipe(name_or_path)
    if "model" not in raw:
        raise ValueError(f"{path}: a config is a mapping with at least 'model'")
    config = deep_merge(DEFAULTS, raw)
    for assignment in overrides:
        apply_override(config, assignment)
    config.setdefault("name", path.stem)
    return config


def resolve_data_root(data_config: Mapping[str, Any]) -> Path:
    root = os.environ.get("MEDSR_DATA_ROOT") or data_config.get("root") or "."
    return Path(root).expanduser().resolve()
