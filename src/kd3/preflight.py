"""Checks that stop a bad run within seconds, before anything expensive starts.

Training a teacher from its recipe or building a benchmark pool takes minutes; a run whose
student architecture is misspelt, whose eval split has other classes than the teacher, or whose
pool images have another size must not get that far. These checks read only what is cheap: the
config, the teacher checkpoint's record (or, for a teacher still to be trained, its recipe and the
split it would train on), the eval split, and the builders' fixed image shape.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kd3.config import ConfigError, DistillConfig, PoolConfig, TeacherTrainConfig, TrainConfig, from_dict, load_config
from kd3.data.pool import Pool
from kd3.engine.logging import summary_writer_class
from kd3.methods.base import Method, get_method
from kd3.models.registry import UnknownModel, check_model_name
from kd3.paths import expand

MIN_BATCH = 2  # BatchNorm needs two images in a batch for its statistics


def method_options(method_cls: type[Method], values: dict[str, Any]) -> Any:
    """The ``method:`` section (less its name) as the method's Options dataclass, unknown keys rejected."""
    options = {k: v for k, v in values.items() if k != "name"}
    return from_dict(method_cls.Options, options, prefix="method.")


def check_method(values: dict[str, Any]) -> tuple[type[Method], Any]:
    """The method class and its options; an unknown name lists the known ones."""
    method_cls = get_method(values.get("name", ""))
    return method_cls, method_options(method_cls, values)


def check_train(train: TrainConfig) -> None:
    """What ``train:`` needs from this machine (ranges were checked when the config was read), and
    a batch BatchNorm can train on."""
    if train.batch_size < MIN_BATCH:
        raise ConfigError(f"train.batch_size={train.batch_size}: a batch of one image gives BatchNorm no batch statistics, "
                          f"so training fails or learns nothing; use train.batch_size={MIN_BATCH} or more (default 256)")
    check_device(train.device)
    if train.logger == "tensorboard":
        summary_writer_class()


def require_model(name: str, key: str) -> None:
    """``name`` (a registered name, ``tv:NAME`` or ``timm:NAME``) is one ``create_model`` can build; checked
    against the name lists only, so nothing is built here."""
    try:
        check_model_name(name)
    except UnknownModel as error:
        raise ConfigError(f"{key}={name!r} is not a known architecture; {error.detail}") from None


def check_device(name: str, key: str = "train.device") -> None:
    """A device string torch parses and this machine has: a CUDA run on a CPU box fails here, not after setup."""
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{key}={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}={name!r} but CUDA is not available on this machine; use {key}=auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"{key}={name!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")


@dataclass(frozen=True)
class InputSpec:
    """What a teacher takes and predicts; ``origin`` names it in messages."""

    num_classes: int
    shape: tuple[int, int, int]  # C, H, W
    origin: str
    classes: tuple[str, ...] = ()  # its class names in logit order (own eval data is matched to them by name)


def _shape_text(shape: tuple[int, ...]) -> str:
    return "×".join(str(int(s)) for s in shape)


def teacher_path(cfg: DistillConfig) -> Path:
    """The configured teacher checkpoint; an error now if it is unset or missing.

    A missing checkpoint is trained from ``teacher.recipe`` only when it is that recipe's own output
    file (a preset's default cache entry): a user-named file that does not exist is a typo or a
    moved file, and training some other teacher under that name would distil from the wrong model."""
    if not cfg.teacher.checkpoint:
        raise ConfigError("teacher.checkpoint is empty: give a kd3 teacher checkpoint (bring your own with "
                          "`kd3 teacher import`, or train one with `kd3 train-teacher teachers/fashion-lenet5_bn`)")
    path = expand(cfg.teacher.checkpoint)
    if path.is_file():
        return path
    if path.exists():
        raise ConfigError(f"teacher.checkpoint={cfg.teacher.checkpoint} is not a file")
    recipe_output = _recipe_output(cfg.teacher.recipe) if cfg.teacher.recipe else None
    if recipe_output is not None and recipe_output.absolute() == path.absolute():
        return path  # the preset's own cache entry: trained from its recipe on first use
    hint = (f"; kd3 trains a missing teacher only into its recipe's own file ({recipe_output})" if recipe_output
            else "; bring your own with `kd3 teacher import` or train one with `kd3 train-teacher CONFIG`")
    raise FileNotFoundError(f"teacher.checkpoint={cfg.teacher.checkpoint}: {path} does not exist; "
                            f"check the path{hint}; nothing was trained")


def _recipe_output(recipe: str) -> Path:
    return expand(load_config(TeacherTrainConfig, recipe).output)


def teacher_spec(cfg: DistillConfig) -> InputSpec:
    """From the checkpoint's record, or, when it is still to be trained, from its recipe's data."""
    from kd3.data.labelled import load_labelled
    from kd3.teacher import read_teacher_info

    path = teacher_path(cfg)
    if path.is_file():
        info = read_teacher_info(path)
        return InputSpec(info.num_classes, (info.in_channels, info.image_size, info.image_size), f"the teacher {path}",
                         tuple(info.classes))
    recipe = load_config(TeacherTrainConfig, cfg.teacher.recipe)
    require_model(recipe.model, f"{cfg.teacher.recipe}: model")
    data = load_labelled(recipe.data, recipe.image_size or None, recipe.channels or None)
    return InputSpec(len(data.classes), tuple(data.images.shape[1:]),
                     f"the teacher {cfg.teacher.recipe} trains ({recipe.data})", tuple(data.classes))


def require_match(spec: InputSpec, shape: tuple[int, ...], num_classes: int | None, what: str) -> None:
    """``what``'s images (and classes, when it has labels) fit the teacher; else one line saying how not."""
    if tuple(shape) != spec.shape:
        raise ConfigError(f"{what} images are {_shape_text(shape)} (C×H×W) but {spec.origin} takes "
                          f"{_shape_text(spec.shape)}; use data of the teacher's size and channels "
                          "(kd3 data ingest --size/--channels for a folder)")
    if num_classes is not None and num_classes != spec.num_classes:
        raise ConfigError(f"{what} has {num_classes} classes but {spec.origin} predicts {spec.num_classes}; "
                          "evaluate on a split of the teacher's own classes")


def check_builder(pool: PoolConfig, spec: InputSpec) -> None:
    """A benchmark pool's knobs and image shape, known without building it."""
    from kd3.data.pools import IMAGE_SHAPE, RECIPES, resolve_knobs

    if pool.name not in RECIPES:
        raise ConfigError(f"pool.name={pool.name!r} is not a pool; known: {', '.join(RECIPES)}, "
                          "file (with pool.path) or source (with pool.source)")
    try:
        resolve_knobs(pool.name, size=pool.size, irrelevant_fraction=pool.irrelevant_fraction,
                      variant=pool.variant, seed=pool.seed)
    except ValueError as error:
        raise ConfigError(f"pool: {error}") from None
    require_match(spec, IMAGE_SHAPE, None, f"pool.name={pool.name}")


def check_pool(pool: Pool, spec: InputSpec, what: str) -> None:
    if len(pool) == 0:
        raise ConfigError(f"{what} holds no images: nothing to distil on (an ingest that decoded nothing, "
                          "or pool.oracle=true on a pool without relevant images)")
    require_match(spec, tuple(pool.images.shape[1:]), None, what)


def images_per_epoch(options: Any, pool_size: int) -> tuple[int, str, str]:
    """The most pool images one epoch can train on under the method's ``options``, the words that say
    why, and the knob that raises it ("" when it is the whole pool): a fixed budget (DFND's ``keep``),
    ``keep_fraction`` where it caps the selection (DFND; KD³ with percentile thresholds), else the
    whole pool (KD³'s FlexMatch thresholds and DFND's estimated budget select a data-dependent share of it)."""
    if getattr(options, "budget", "fixed") != "fixed":  # DFND's budget estimated from the data: not known here
        return pool_size, f"a pool of {pool_size} image{'s' * (pool_size != 1)}", ""
    keep = getattr(options, "keep", None)
    if keep is not None:
        return min(int(keep), pool_size), f"method.keep={keep} of {pool_size} pool images", "method.keep"
    fraction = getattr(options, "keep_fraction", None)
    if fraction is None or not getattr(options, "selection", True) or getattr(options, "threshold_rule", "percentile") != "percentile":
        return pool_size, f"a pool of {pool_size} image{'s' * (pool_size != 1)}", ""
    return (math.floor(fraction * pool_size), f"method.keep_fraction={fraction:g} of {pool_size} pool images",
            "method.keep_fraction")


def check_budget(method_cls: type[Method], options: Any, train: TrainConfig, num_classes: int, pool_size: int,
                 what: str) -> None:
    """A pool method trains on at least one batch per epoch, and a budget shared equally by the
    classes (KD³'s percentile thresholds, DFND's ``per_class``) leaves every class an image: a run on
    less trains on almost nothing, and its at-chance student would then be blamed on the learning rate."""
    if method_cls.uses_original_data:
        return
    trained, why, knob = images_per_epoch(options, pool_size)
    fixes = [f"a pool of at least {train.batch_size} images" if not knob else f"a larger {knob} or a bigger pool"]
    if trained < train.batch_size:
        if trained >= MIN_BATCH:
            fixes.append(f"train.batch_size={trained} or less")
        raise ConfigError(f"{what}: an epoch can train on at most {trained} image{'s' * (trained != 1)} ({why}), fewer than one batch "
                          f"(train.batch_size={train.batch_size}); use {' or '.join(fixes)}")
    shared = getattr(options, "per_class", False) or (getattr(options, "selection", False)
                                                       and getattr(options, "threshold_rule", "") == "percentile")
    if shared and trained < num_classes:
        raise ConfigError(f"{what}: the selection budget of {trained} images ({why}) is shared equally by the teacher's "
                          f"{num_classes} classes, so no class keeps an image; use a larger {knob} or a bigger pool")


def pool_description(pool: PoolConfig) -> str:
    if pool.name == "file":
        return f"pool.path={pool.path}"
    if pool.name == "source":
        return f"pool.source={pool.source}"
    return f"pool.name={pool.name}"
