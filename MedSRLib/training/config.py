"""Recipe configs: YAML or JSON files, defaults, `--set key.path=value` overrides, data root.

Relative data paths resolve against `data.root`; a relative root resolves against the current
directory, and the environment variable MEDSR_DATA_ROOT (or `--data-root`) overrides it.
The recipes shipped with MedSR are in `MedSRLib/training/configs/` (tiny CI variants in
`configs/ci/`).
"""

from __future__ import annotations

import copy
import difflib
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from ..errors import InputError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

#: Where the CLI's error messages send users who look for a recipe.
LIST_HINT = "see `medsr train --list` for the shipped recipes"


class ConfigError(InputError):
    """A recipe config (or a `--set` override) cannot be read or names an invalid value."""


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

#: Top-level keys the trainer reads; anything else is a typo (e.g. "trian:") and rejected.
KNOWN_KEYS = frozenset({*DEFAULTS, "name", "extends", "model", "scales", "task", "gan", "init_from", "init_zero",
                        "presence_weight", "score_threshold"})
PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("adam", "sgd")


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(dict(base))
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def find_config(name_or_path: str | Path) -> Path:
    """A config path, or the name of a shipped recipe ("edsr_baseline_x2", "ci/srcnn").

    ConfigError naming `name_or_path` when it is neither."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / f"{name_or_path}.yaml", CONFIG_DIR / str(name_or_path)):
        if candidate.is_file():
            return candidate
    if path.is_dir():
        raise ConfigError(f"{name_or_path}: is a folder, not a config file; {LIST_HINT}")
    raise ConfigError(f"{name_or_path}: no such config file or shipped recipe; {LIST_HINT}")


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML parser error in one line: the problem and where (1-based line and column)."""
    problem = getattr(err, "problem", None)
    mark = getattr(err, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(err).split())


def apply_override(config: dict[str, Any], assignment: str) -> None:
    """Apply "a.b.c=value" (value parsed as YAML) to `config` in place.

    ConfigError naming the override when it is not KEY.PATH=VALUE, its value is not YAML, or
    the path runs through a value that is not a mapping (e.g. train.steps.x=1)."""
    key, sep, raw = assignment.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(part.strip() for part in parts):
        raise ConfigError(f"--set {assignment!r}: an override looks like KEY.PATH=VALUE, "
                          f"e.g. train.steps=200")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {assignment!r}: value is not valid YAML ({_yaml_problem(err)})") from None
    node = config
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {assignment!r}: {'.'.join(parts[:depth + 1])} is "
                              f"{child!r}, not a mapping of keys")
        node = child
    node[parts[-1]] = value


def _kind_of(value: Any) -> str:
    """What `value` is, in words ("a list", "a string", ...), for a wrong-type message."""
    if value is None:
        return "an empty document"
    names = {list: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean"}
    return names.get(type(value), f"a {type(value).__name__}")


def _read_recipe(name_or_path: str | Path, chain: tuple[Path, ...] = ()) -> tuple[Path, dict[str, Any]]:
    """The recipe's mapping, merged over the recipe it names in `extends` (recursively; lists such
    as `data.sources` or `loss` are replaced, not appended)."""
    path = find_config(name_or_path)
    if path in chain:
        raise ConfigError(f"{path}: 'extends' loops back to itself")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (a config is YAML or JSON)") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read ({err.strerror or err})") from None
    try:
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(err)})") from None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: a config is a mapping of keys to values (model: ..., data: ...), "
                          f"not {_kind_of(raw)}")
    raw = dict(raw)
    parent = raw.pop("extends", None)
    if parent is None:
        return path, raw
    if not isinstance(parent, (str, Path)):
        raise ConfigError(f"{path}: extends must name a config file or shipped recipe, got {parent!r}")
    try:
        find_config(parent)
    except ConfigError:
        raise ConfigError(f"{path}: extends {parent!r}, which is no config file or shipped recipe; "
                          f"{LIST_HINT}") from None
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
    defaults, apply overrides, check the result (`check_config`).

    ConfigError (an InputError) naming the file or override and the problem otherwise."""
    path, raw = _read_recipe(name_or_path)
    if "model" not in raw:
        raise ConfigError(f"{path}: no 'model' key (the registry name of the network to train, "
                          f"see `medsr models`)")
    config = deep_merge(DEFAULTS, raw)
    for assignment in overrides:
        apply_override(config, assignment)
    config.setdefault("name", path.stem)
    check_config(config, path)
    return config


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_config(config: Mapping[str, Any], origin: str | Path) -> None:
    """ConfigError "<origin>: <key> ..." for an unknown top-level key or a value the trainer
    cannot use (unknown model, non-positive steps, unknown precision, a section that is not a
    mapping, ...). Checks the shape of the config, not the data it points to."""
    unknown = sorted(set(config) - KNOWN_KEYS)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(KNOWN_KEYS), n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(sorted(KNOWN_KEYS))}"
        raise ConfigError(f"{origin}: unknown key {unknown[0]!r}; {hint}")
    model = config.get("model")
    if not isinstance(model, str):
        raise ConfigError(f"{origin}: model must be a registry name (see `medsr models`), got {model!r}")
    from ..models import registry as zoo
    if model not in zoo.model_names():
        raise ConfigError(f"{origin}: unknown model {model!r}; known models: {', '.join(zoo.model_names())}")
    for section in ("data", "train", "optimizer", "output", "model_config"):
        value = config.get(section)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{origin}: {section} must be a mapping of keys, not {_kind_of(value)}")
    for section in ("degradation", "loss"):
        value = config.get(section)
        if not isinstance(value, list):
            raise ConfigError(f"{origin}: {section} must be a list of steps, not {_kind_of(value)}")
    if not _is_count(config.get("scale")):
        raise ConfigError(f"{origin}: scale must be a positive integer, got {config.get('scale')!r}")
    scales = config.get("scales")
    if scales is not None and not (isinstance(scales, list) and scales and all(map(_is_count, scales))):
        raise ConfigError(f"{origin}: scales must be a list of positive integers, got {scales!r}")
    train_cfg = config["train"]
    for key in ("steps", "batch_size"):
        if key in train_cfg and not _is_count(train_cfg[key]):
            raise ConfigError(f"{origin}: train.{key} must be a positive integer, got {train_cfg[key]!r}")
    if train_cfg.get("precision", "fp32") not in PRECISIONS:
        raise ConfigError(f"{origin}: train.precision must be one of {', '.join(PRECISIONS)}, "
                          f"got {train_cfg['precision']!r}")
    if config["optimizer"].get("type", "adam") not in OPTIMIZERS:
        raise ConfigError(f"{origin}: optimizer.type must be one of {', '.join(OPTIMIZERS)}, "
                          f"got {config['optimizer']['type']!r}")
    data_cfg = config["data"]
    if not isinstance(data_cfg.get("root"), (str, type(None))):
        raise ConfigError(f"{origin}: data.root must be a folder path, got {data_cfg['root']!r}")
    sources = data_cfg.get("sources")
    if not isinstance(sources, list) or not all(isinstance(s, Mapping) for s in sources):
        raise ConfigError(f"{origin}: data.sources must be a list of mappings (glob: ..., modality: ...), "
                          f"got {sources!r}")


def resolve_data_root(data_config: Mapping[str, Any]) -> Path:
    root = os.environ.get("MEDSR_DATA_ROOT") or data_config.get("root") or "."
    return Path(root).expanduser().resolve()


def check_data_root(config: Mapping[str, Any]) -> Path:
    """The resolved data root (`resolve_data_root`); ConfigError naming it when a data source
    with a relative glob or file list needs it and it is not an existing folder."""
    data_cfg = config["data"]
    root = resolve_data_root(data_cfg)
    patterns = [p for source in data_cfg.get("sources") or []
                for p in ([source["glob"]] if source.get("glob") else list(source.get("files") or []))]
    if not any(not Path(str(p)).is_absolute() for p in patterns) or root.is_dir():
        return root
    problem = "is not a folder" if root.exists() else "data folder not found"
    if os.environ.get("MEDSR_DATA_ROOT"):
        raise ConfigError(f"{root}: {problem} (given by --data-root or MEDSR_DATA_ROOT)")
    raise ConfigError(f"{root}: {problem} (data.root of {config.get('name', 'the config')}); "
                      f"pass --data-root DIR or set MEDSR_DATA_ROOT")
