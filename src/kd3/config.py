"""Config schema (dataclasses), YAML loading and ``key=value`` overrides.

Every run saves its resolved config, so a result can always be traced to the exact settings.
Unknown keys and wrongly typed values are rejected with the list of valid keys.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import reprlib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml


class ConfigError(ValueError):
    pass


# Bounds on typed config input (files and key=value overrides): a config is a few kilobytes and a
# few hundred values, so these only ever stop a hostile or broken input, never a real one.
MAX_CONFIG_BYTES = 1 << 20
MAX_YAML_VALUES = 100_000  # scalars, lists and mappings once every alias is expanded
SHOWN_CHARS = 80  # a value quoted in an error message is cut to this
MAX_KEY_CHARS = 200  # an unknown key is matched against the valid ones (difflib) cut to this
MAX_OVERRIDE_CHARS = 4096


def _repr_limits() -> reprlib.Repr:
    limits = reprlib.Repr()  # builds only what it shows: bounded even for a value that would expand hugely
    limits.maxstring = limits.maxother = SHOWN_CHARS
    limits.maxlist = limits.maxtuple = limits.maxdict = limits.maxset = 6
    limits.maxlevel = 3
    return limits


_REPR = _repr_limits()


def short(value: Any) -> str:
    """``repr(value)`` for an error message, cut to about ``SHOWN_CHARS`` characters."""
    text = _REPR.repr(value)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 3] + "..."


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats: PyYAML follows YAML 1.1, where ``1e-3`` (no dot) is
    a string, so ``train.lr=1e-3`` failed as "expected float, got '1e-3'"."""


_FLOAT_TAG = "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {first: [r for r in resolvers if r[0] != _FLOAT_TAG]
                                   for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
# YAML 1.2's core-schema float (sign, digits with an optional dot, optional exponent with an optional
# sign), keeping PyYAML's ``_`` digit separators; added after the int resolver, so ``10`` stays an int.
_Loader.add_implicit_resolver(_FLOAT_TAG, re.compile(r"""^(?:
    [-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)?
   |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
   |[-+]?\.(?:inf|Inf|INF)
   |\.(?:nan|NaN|NAN))$""", re.X), list("-+0123456789."))


def _expanded_values(root: yaml.Node, limit: int) -> int:
    """How many values the composed document holds with every alias expanded, counted up to ``limit + 1``.

    PyYAML composes an alias as a second reference to the anchored node, so a few hundred bytes of
    nested aliases (a "billion laughs") are a small graph that anything walking the values (type
    checks, repr in a message, dump) expands exponentially. Sizes are memoised per node (linear in
    the graph) and a node that contains itself counts as unbounded."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()  # entered and not finished: ancestors of what the walk is on
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        if id(node) in sizes:
            continue
        value = node.value if isinstance(node, yaml.CollectionNode) else []
        children = [part for pair in value for part in pair] if isinstance(node, yaml.MappingNode) else value
        if finished:
            open_nodes.discard(id(node))
            sizes[id(node)] = min(limit + 1, 1 + sum(sizes[id(child)] for child in children))
            continue
        if id(node) in open_nodes:
            return limit + 1
        open_nodes.add(id(node))
        stack.append((node, True))
        stack.extend((child, False) for child in children if id(child) not in sizes)
    return sizes[id(root)]


def load_yaml(text: str, where: str) -> Any:
    """``text`` as YAML (safe types only, YAML 1.2 floats), refused in one ``ConfigError`` line naming
    ``where`` when aliases expand it past ``MAX_YAML_VALUES`` values or it nests too deeply."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_values(node, MAX_YAML_VALUES) > MAX_YAML_VALUES:
            raise ConfigError(f"{where}: more than {MAX_YAML_VALUES} values once its aliases (*name) are expanded, "
                              "or an alias inside itself; write the values out instead of aliasing them")
        return loader.construct_document(node)
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply to be a kd3 config") from None
    finally:
        loader.dispose()


# The presets ship inside the package, so `kd3 distill fashion-wild/recommended` works from any directory
# of any install; the repository's configs/ is a link to this folder.
PRESETS_DIR = Path(__file__).resolve().parent / "configs"


def did_you_mean(word: str, options: list[str], quote: bool = False) -> str:
    """``" (did you mean X?)"`` for the option closest to a misspelt ``word``, or ``""`` when none is close."""
    matches = difflib.get_close_matches(word, options, n=1)
    if not matches:
        return ""
    return f" (did you mean {matches[0]!r}?)" if quote else f" (did you mean {matches[0]}?)"


def preset_names() -> list[str]:
    """Every packaged preset by name: its path under kd3/configs without ``.yaml``, e.g. ``fashion-wild/recommended``."""
    return sorted(path.relative_to(PRESETS_DIR).with_suffix("").as_posix() for path in PRESETS_DIR.rglob("*.yaml"))


def preset_description(name: str) -> str:
    """A preset's first comment line (what it is), without the ``#``."""
    for line in (PRESETS_DIR / f"{name}.yaml").read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return ""


def resolve_config(path: str | Path) -> Path:
    """The YAML file a config argument names: an existing file as given; else the packaged preset of that name,
    with or without ``.yaml`` and with or without a leading ``configs/`` (how presets name teacher recipes and
    bench rows, so those resolve outside the repository too); else a ConfigError suggesting the closest preset."""
    given = Path(path)
    if given.is_file():
        return given
    name = given.as_posix().removeprefix("./").removeprefix("configs/").removesuffix(".yaml")
    preset = PRESETS_DIR / f"{name}.yaml"
    if not given.is_absolute() and preset.is_file():
        return preset
    names = preset_names()
    hint = did_you_mean(name, names) or _same_stem(name, names)
    raise ConfigError(f"config file {path} does not exist and is not a kd3 preset{hint}; `kd3 config list` lists the presets")


def _same_stem(name: str, names: list[str]) -> str:
    """``" (did you mean A or B?)"`` for presets whose last component is close to ``name``'s (``kd3`` -> ``fashion-wild/kd3``)."""
    stem = name.rsplit("/", 1)[-1]
    close = [n for n in names if difflib.get_close_matches(stem, [n.rsplit("/", 1)[-1]], n=1)][:3]
    return f" (did you mean {' or '.join(close)}?)" if close else ""


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
    # Linear learning-rate warmup over the first N epochs (may be fractional), stepped every optimizer step from
    # ~0 to the schedule's value; 0 = none. Keeps a high base lr from throwing a run off in its first steps.
    warmup_epochs: float = 0.0
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
    contamination_against: str = ""  # SOURCE:SPLIT or your own folder / CSV / .npz


@dataclass
class DistillConfig:
    name: str = "distill"
    output_dir: str = "runs"
    student: str = "lenet5_half_bn"
    eval_data: str = "fashion-mnist:test"  # SOURCE:SPLIT, or your own folder / CSV / .npz, the student is tested on; "" for none
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
    # SOURCE:SPLIT, or your own labelled images: a folder of class sub-folders, a path,label .csv or an
    # .npz (kd3.data.labelled); val_data / test_data are matched to data's classes by name.
    data: str = "fashion-mnist:o-train"
    val_data: str = "fashion-mnist:o-val"
    test_data: str = "fashion-mnist:test"
    # What own images are decoded to (required for a folder or .csv); 0 = the data's own.
    image_size: int = 0
    channels: int = 0  # 1 (grey) or 3 (RGB)
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


def _plain_name(value: str) -> bool:
    """A name that stays one folder inside output_dir: no path separator, no NUL, not ``.`` or ``..``."""
    return value not in (".", "..") and not any(c in value for c in "/\\\0")


_NAME: Check = (_plain_name, "a plain name for the run folder, without / \\ or .. (e.g. name=my-run)")
_FRACTION: Check = ((lambda v: 0 <= v <= 1), "in [0, 1]")
_POSITIVE: Check = ((lambda v: v > 0), "> 0")

LOGGERS = ("jsonl", "tensorboard")
RANGES: dict[type, dict[str, Check]] = {
    TrainConfig: {
        "epochs": _at_least(1), "batch_size": _at_least(1), "lr": _POSITIVE,
        "momentum": ((lambda v: 0 <= v < 1), "in [0, 1)"), "weight_decay": ((lambda v: v >= 0), "≥ 0"),
        "schedule": _one_of("step", "cosine"), "milestones": _FRACTION, "gamma": _POSITIVE,
        "warmup_epochs": ((lambda v: v >= 0), "≥ 0"),
        "threads": _at_least(0), "eval_every": _at_least(1), "epoch_steps": _at_least(0), "logger": _one_of(*LOGGERS),
    },
    AugmentConfig: {"padding": _at_least(0)},
    DistillConfig: {"name": _NAME},
    TeacherTrainConfig: {"name": _NAME},
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
            raise ConfigError(f"{key}: expected a mapping of {_type_name(tp)} fields, got {short(value)}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {short(value)}")
        (item_type,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {short(value)}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, float) and value.is_integer():  # 1e5 is a float in YAML, as in Python
        raise ConfigError(f"{key}: expected an integer, got {short(value)} (a float); write it as {int(value)}")
    if tp in (int, float) and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {short(value)} ({type(value).__name__})")
    if tp is float and not math.isfinite(value):  # YAML reads .nan and .inf; no kd3 setting means either
        raise ConfigError(f"{key}: must be a finite number, got {short(value)}")
    return value


def from_dict(cls: type[C], values: dict[str, Any], prefix: str = "") -> C:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")}
    unknown = sorted(str(key)[:MAX_KEY_CHARS] for key in values if key not in fields)  # YAML keys may be numbers
    if unknown:
        valid = ", ".join(prefix + name for name in fields)
        hint = did_you_mean(prefix + unknown[0], [prefix + name for name in fields], quote=True) \
            or _nested_hint(cls, unknown[0], prefix)
        raise ConfigError(f"unknown key {short(prefix + unknown[0])}{hint}; valid keys here: {valid}")
    kwargs = {name: _coerce(value, hints[name], prefix + name) for name, value in values.items()}
    config = cls(**kwargs)
    check_ranges(config, prefix)
    return config


def _nested_hint(cls: type, key: str, prefix: str) -> str:
    """A key one section too high (``epochs=3`` for ``train.epochs=3``): the nested keys whose last part is close to it."""
    hints = typing.get_type_hints(cls)
    nested = [f"{prefix}{f.name}.{g.name}" for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])
              for g in dataclasses.fields(hints[f.name])]
    close = [k for k in nested if difflib.get_close_matches(key, [k.rsplit(".", 1)[-1]], n=1)]
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_ranges(config: Any, prefix: str = "") -> None:
    """Reject values of the right type that no run can use (``RANGES``), naming key, value and range."""
    for name, (valid, text) in RANGES.get(type(config), {}).items():
        value = getattr(config, name)
        if not all(valid(v) for v in (value if isinstance(value, list) else [value])):
            raise ConfigError(f"{prefix}{name}: must be {text}, got {short(value)}")


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.lr=0.1`` -> (["train", "lr"], 0.1); values are read as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {short(text)} must look like key=value (e.g. train.epochs=5)")
    if len(text) > MAX_OVERRIDE_CHARS:
        raise ConfigError(f"override {short(text)} is {len(text)} characters; a key=value override is at most "
                          f"{MAX_OVERRIDE_CHARS} (put long values in a config file)")
    key, raw = text.split("=", 1)
    try:
        value = load_yaml(raw, f"override {short(text)}") if raw.strip() else ""
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
                raise ConfigError(f"override {short(text)}: {short(part)} is not a section")
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


def _read_text(path: Path) -> str:
    """The file's text, refused in one line when it is over ``MAX_CONFIG_BYTES`` (read no further than that)
    or not UTF-8."""
    with path.open("rb") as handle:
        data = handle.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: over {MAX_CONFIG_BYTES // 1024} KiB, too big to be a kd3 config "
                          "(a config is a few kilobytes); is it the right file?")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text (byte {error.start}); a config is a YAML text file") from None


def _parse_yaml(path: Path) -> Any:
    try:
        return load_yaml(_read_text(path), str(path))
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
    if not seen:
        path = resolve_config(path)
    elif not path.is_file():
        raise ConfigError(f"config file {path} does not exist (the base of {seen[-1]})")
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
        raise ConfigError(f"{path}: base must be a file name (e.g. base: base.yaml), got {short(base)}")
    return _merge(read_yaml(path.parent / base, (*seen, path)), values)


def load_config(cls: type[C], path: str | Path | None, overrides: list[str] = ()) -> C:
    """``cls`` from a config file or preset name (``resolve_config``), its ``base`` chain and ``key=value`` overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        values = read_yaml(path)
    try:
        return from_dict(cls, apply_overrides(values, list(overrides)))
    except ConfigError as error:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(where + str(error)) from None


def dump_config(config: Any) -> str:
    """The resolved config as YAML: what a run saves and `kd3 config show` prints."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def save_config(config: Any, path: Path) -> None:
    """Write ``dump_config(config)`` whole or not at all (temp file, then rename): a resume rewrites a
    run's config.yaml, and a crash then must not leave the run without one."""
    staged = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        staged.write_text(dump_config(config))
        os.replace(staged, path)
    finally:
        staged.unlink(missing_ok=True)
