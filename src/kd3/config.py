"""Config schema (dataclasses), YAML loading and ``key=value`` overrides.

Every run saves its resolved config, so a result can always be traced to the exact settings.
Unknown keys and wrongly typed values are rejected with the list of valid keys.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml


class ConfigError(ValueError):
    pass


@dataclass
class AugmentConfig:
    padding: int = 2  # random crop after zero padding by this many pixels
    flip: bool = True  # horizontal flip; turn off for digits and text


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 256
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "step"  # "step" (×gamma at the milestones) or "cosine"
    milestones: list[float] = field(default_factory=lambda: [0.625, 0.75, 0.875])  # fractions of epochs
    gamma: float = 0.1
    amp: bool = False  # bf16 torch.autocast
    channels_last: bool = False
    device: str = "auto"  # auto, cpu, cuda, cuda:1, ...
    seed: int = 0
    threads: int = 0  # torch CPU threads; 0 keeps torch's default
    eval_every: int = 1  # evaluate on the eval split every N epochs (and always after the last)
    # Optimizer steps per epoch; 0 = one pass over the epoch's training set. A fixed number puts
    # methods that train on a subset (selection, oracle) on the same compute as those on the whole pool.
    epoch_steps: int = 0
    logger: str = "jsonl"  # metrics.jsonl always; "tensorboard" mirrors it to run_dir/tensorboard (kd3[tensorboard])


@dataclass
class TeacherRef:
    checkpoint: str = ""  # path to a teacher checkpoint; "{cache}" expands to kd3's cache folder
    recipe: str = ""  # a train-teacher config that makes the checkpoint when it is missing


@dataclass
class PoolConfig:
    name: str = "fashion-wild"  # a builder (fashion-wild, digits-wild), "file" (an ingested .npz) or "source"
    path: str = ""  # with name=file: the .npz or pool directory written by `kd3 data ingest`
    source: str = ""  # with name=source: a labelled source's images, labels dropped (e.g. imagenet32:train)
    size: int = 20000
    irrelevant_fraction: float = 0.7
    variant: str = "default"  # default or hard
    seed: int = 0
    oracle: bool = False  # keep only truly relevant images (uses provenance: a reference, not a method)
    # Drop pool images that are exact or near copies of evaluation images (`kd3 data contamination`),
    # checked against contamination_against, or eval_data when that is empty.
    drop_contaminated: bool = False
    contamination_against: str = ""


@dataclass
class DistillConfig:
    name: str = "distill"
    output_dir: str = "runs"
    student: str = "lenet5_half_bn"
    eval_data: str = "fashion-mnist:test"  # SOURCE:SPLIT the student is tested on; "" for none (accuracy unknown)
    teacher: TeacherRef = field(default_factory=TeacherRef)
    pool: PoolConfig = field(default_factory=PoolConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    method: dict[str, Any] = field(default_factory=lambda: {"name": "blind_kd"})
    progress: bool = True


@dataclass
class TeacherTrainConfig:
    name: str = "teacher"
    model: str = "lenet5_bn"
    data: str = "fashion-mnist:o-train"
    val_data: str = "fashion-mnist:o-val"
    test_data: str = "fashion-mnist:test"
    output: str = "{cache}/teachers/fashion-lenet5_bn.pt"
    output_dir: str = "runs"
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    progress: bool = True


# What each numeric or choice field may hold: (test, the range in words). Checked when a config is
# read, so a run that cannot work stops within seconds instead of after the teacher or pool is built.
Check = tuple[Callable[[Any], bool], str]


def _at_least(low: int) -> Check:
    return (lambda v: v >= low), f"an integer ≥ {low}"


def _one_of(*options: str) -> Check:
    return (lambda v: v in options), "one of " + ", ".join(options)


_FRACTION: Check = ((lambda v: 0 <= v <= 1), "in [0, 1]")
_POSITIVE: Check = ((lambda v: v > 0), "> 0")

LOGGERS = ("jsonl", "tensorboard")
RANGES: dict[type, dict[str, Check]] = {
    TrainConfig: {
        "epochs": _at_least(1), "batch_size": _at_least(1), "lr": _POSITIVE,
        "momentum": ((lambda v: 0 <= v < 1), "in [0, 1)"), "weight_decay": ((lambda v: v >= 0), "≥ 0"),
        "schedule": _one_of("step", "cosine"), "milestones": _FRACTION, "gamma": _POSITIVE,
        "threads": _at_least(0), "eval_every": _at_least(1), "epoch_steps": _at_least(0), "logger": _one_of(*LOGGERS),
    },
    AugmentConfig: {"padding": _at_least(0)},
    PoolConfig: {"size": _at_least(1), "irrelevant_fraction": _FRACTION},
}

C = TypeVar("C")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0])
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {_type_name(tp)} fields, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_type,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if tp is float and not math.isfinite(value):  # YAML reads .nan and .inf; no kd3 setting means either
        raise ConfigError(f"{key}: must be a finite number, got {value!r}")
    return value


def from_dict(cls: type[C], values: dict[str, Any], prefix: str = "") -> C:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        valid = ", ".join(prefix + name for name in fields)
        raise ConfigError(f"unknown key {prefix + unknown[0]!r}; valid keys here: {valid}")
    kwargs = {name: _coerce(value, hints[name], prefix + name) for name, value in values.items()}
    config = cls(**kwargs)
    check_ranges(config, prefix)
    return config


def check_ranges(config: Any, prefix: str = "") -> None:
    """Reject values of the right type that no run can use (``RANGES``), naming key, value and range."""
    for name, (valid, text) in RANGES.get(type(config), {}).items():
        value = getattr(config, name)
        if not all(valid(v) for v in (value if isinstance(value, list) else [value])):
            raise ConfigError(f"{prefix}{name}: must be {text}, got {value!r}")


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.lr=0.1`` -> (["train", "lr"], 0.1); values are read as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. train.epochs=5)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not a YAML scalar (e.g. "{cache}/x.pt"): take it as the plain string it is
    return key.strip().split("."), value


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = values
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
        node[path[-1]] = value
    return values


# A child's method section replaces the base's whole: options of one method mean nothing to another.
WHOLE_SECTIONS = ("method",)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        nested = isinstance(value, dict) and isinstance(merged.get(key), dict) and key not in WHOLE_SECTIONS
        merged[key] = _merge(merged[key], value) if nested else value
    return merged


def _parse_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as error:
        def at(mark: Any) -> str:
            return f"line {mark.line + 1}, column {mark.column + 1}"

        mark = error.problem_mark or error.context_mark
        where = f" at {at(mark)}" if mark else ""
        # The context says what was open when it broke, e.g. "while parsing a flow sequence" and where it began.
        context = f" ({error.context} at {at(error.context_mark)})" if error.context and error.context_mark else ""
        raise ConfigError(f"{path}: YAML syntax error{where}: {error.problem or error.context}{context}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: YAML syntax error: {error}") from None


def read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML mapping; a ``base: other.yaml`` key (relative to this file) is loaded first and
    deep-merged under this file's keys, so presets share one base instead of repeating it.
    ``seen`` is the chain of files that led here (each one's base is the next)."""
    if not path.is_file():
        via = f" (the base of {seen[-1]})" if seen else " (presets live under configs/)"
        raise ConfigError(f"config file {path} does not exist{via}")
    if path.resolve() in [p.resolve() for p in seen]:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise ConfigError(f"{path}: the 'base' chain loops: {chain}")
    values = _parse_yaml(path) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    base = values.pop("base", None)
    if base is None:
        return values
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base must be a file name (e.g. base: base.yaml), got {base!r}")
    return _merge(read_yaml(path.parent / base, (*seen, path)), values)


def load_config(cls: type[C], path: str | Path | None, overrides: list[str] = ()) -> C:
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        values = read_yaml(path)
    try:
        return from_dict(cls, apply_overrides(values, list(overrides)))
    except ConfigError as error:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(where + str(error)) from None


def save_config(config: Any, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
