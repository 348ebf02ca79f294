"""The library entry points the CLI calls: train a teacher, distil a student, evaluate a model."""
from __future__ import annotations

import math
import os
import shutil
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

import kd3.methods  # noqa: F401  (registers every method)
from kd3 import preflight
from kd3.config import ConfigError, DistillConfig, TeacherTrainConfig, load_config, save_config, short, to_dict
from kd3.data.augment import CropFlip, Normalizer
from kd3.data.contamination import drop_contaminated, evaluation_images, pool_contamination
from kd3.data.labelled import load_labelled
from kd3.data.pool import Pool
from kd3.data.pools import load_or_build_pool
from kd3.data.sources import LabelledData, load_source
from kd3.engine import checkpoint, distributed, faults, run_lock, signals
from kd3.engine.evaluate import EvalResult, evaluate, predict_logits
from kd3.engine.export import ShippedClassifier, ship, shipped_meta
from kd3.engine.trainer import Provenance, RunResult, Trainer, lr_factor, resolve_device
from kd3.methods.base import DistillContext, Method, get_method
from kd3.models import create_model
from kd3.models.base import Net
from kd3.paths import cache_dir, expand
from kd3.preflight import method_options  # also kd3.api.method_options, as before
from kd3.run_inputs import check as check_inputs
from kd3.run_inputs import describe as describe_inputs
from kd3.run_inputs import record as record_inputs
from kd3.shipped import ShippedModel, load_model_file
from kd3.teacher import TeacherInfo, load_teacher, save_teacher
from kd3.teacher_eval import read_teacher_accuracy, record_teacher_accuracy
from kd3.utils.filelock import load_or_build
from kd3.utils.safe_load import refuse_unsafe


def new_run_dir(output_dir: str, name: str) -> Path:
    """``<output_dir>/<name>-<time>``, else ``...+1``, ``+2``, ...: ``mkdir`` without ``exist_ok`` is
    the claim (atomic), so runs started in the same second, in any processes, never share one."""
    base = Path(output_dir) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if base.resolve().parent != Path(output_dir).resolve():  # checked before anything is created
        raise ConfigError(f"name={short(name)} would put the run folder outside output_dir={short(output_dir)}; "
                          "give a plain name without / or .. (e.g. name=my-run)")
    with faults.writing(Path(output_dir), "nothing was trained"):
        base.parent.mkdir(parents=True, exist_ok=True)
        suffix = 0
        while True:
            run_dir = base.with_name(f"{base.name}+{suffix}") if suffix else base
            try:
                run_dir.mkdir()
                return run_dir
            except FileExistsError:
                suffix += 1


def run_name(cfg: DistillConfig) -> str:
    """``cfg.name``, plus the pool and the teacher when they are not the preset's own: a run of the
    fashion-wild preset on the user's pool and teacher must not be filed as a fashion-wild run."""
    parts = [cfg.name]
    if cfg.pool.name in ("file", "source"):
        parts.append(_label(cfg.pool.path.rstrip("/") if cfg.pool.name == "file" else cfg.pool.source))
    teacher = expand(cfg.teacher.checkpoint)
    if not cfg.teacher.recipe or expand(load_config(TeacherTrainConfig, cfg.teacher.recipe).output) != teacher:
        parts.append(_label(str(teacher)))
    return "-".join(part for i, part in enumerate(parts) if part and part not in parts[:i])


def _label(path_or_source: str) -> str:
    """A file-name-safe short name: a path's stem, or a SOURCE:SPLIT with the colon replaced."""
    stem = Path(path_or_source).stem if "/" in path_or_source or "." in path_or_source else path_or_source
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)


def _setup(train_seed: int, threads: int) -> None:
    if threads:
        torch.set_num_threads(threads)
    checkpoint.seed_everything(train_seed)


def _prepare_run(cfg: Any, resume: Path | None, owner: ExitStack | None = None) -> Path:
    """The run directory, proven writable (a read-only or full output_dir fails here, in one line,
    before a teacher is trained or a pool built). With ``owner``, a new run directory is locked
    (``run_lock``) as it is created, the lock held until ``owner`` closes."""
    if resume is None:
        run_dir = new_run_dir(cfg.output_dir, run_name(cfg) if isinstance(cfg, DistillConfig) else cfg.name)
        if owner is not None:
            owner.enter_context(run_lock.hold(run_dir))
        with faults.writing(run_dir / "config.yaml", "nothing was trained"):
            save_config(cfg, run_dir / "config.yaml")
        return run_dir
    if not (resume / "last.pt").is_file() and not (resume / "prev.pt").is_file():
        raise FileNotFoundError(f"--resume {resume}: no last.pt there (is it a kd3 run directory?)")
    faults.check_writable(resume)
    return resume


def _resume(trainer: Trainer, run_dir: Path, cfg: DistillConfig | None = None) -> None:
    """Load the run's checkpoint into ``trainer``. With ``cfg`` (a distillation resume, overrides applied:
    ``_resumed_config``): refuse fewer epochs than were trained, take the learning rate the (maybe
    longer) schedule gives from here on, and save ``cfg`` as the run's config.yaml."""
    with refuse_unsafe(run_dir / "last.pt", "kd3 run checkpoint"):  # torch.load(weights_only=True) inside
        trainer.resume()
    if cfg is None:
        return
    trained = trainer.start_epoch
    if cfg.train.epochs < trained:
        raise ConfigError(f"train.epochs={cfg.train.epochs}: {run_dir / 'last.pt'} has already trained {trained} epochs; "
                          f"give train.epochs={trained} or more")
    # The checkpoint holds the rate the old epoch count scheduled; with more epochs the schedule
    # stretches, and this epoch's rate is the new schedule's (the same value when nothing changed).
    for group in trainer.optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lr_factor(trained, cfg.train)
    config = run_dir / "config.yaml"
    saved = load_config(DistillConfig, config)
    if distributed.is_main() and saved != cfg:
        with faults.writing(config, f"the run is unchanged; {config} still holds its old settings"):
            save_config(cfg, config)
        print(f"kd3: resuming {run_dir} with {_changed_settings(saved, cfg)} (saved to {config})", file=sys.stderr)


# What ``--resume RUN key=value`` may change: how long and where the run trains and what it shows.
# Anything else would make one run of two configs: its checkpoint was trained with the old values.
RESUMABLE = ("train.epochs", "train.eval_every", "train.threads", "train.device", "progress")
_UNSET = object()


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        flat.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


def _differences(old: DistillConfig, new: DistillConfig) -> list[tuple[str, Any, Any]]:
    """``(dotted key, old value, new value)`` for each setting that differs (``_UNSET`` where a method option is absent)."""
    before, after = _flat(to_dict(old)), _flat(to_dict(new))
    keys = [*before, *(key for key in after if key not in before)]
    return [(key, before.get(key, _UNSET), after.get(key, _UNSET)) for key in keys
            if before.get(key, _UNSET) != after.get(key, _UNSET)]


def _changed_settings(old: DistillConfig, new: DistillConfig) -> str:
    return ", ".join(f"{key} {short(a)} -> {short(b)}" for key, a, b in _differences(old, new))


def _resumed_config(run_dir: Path, overrides: list[str] | tuple[str, ...], owner: ExitStack) -> DistillConfig:
    """The config of the run in ``run_dir`` with ``overrides`` applied, once this process owns the run
    (``run_lock``, taken before anything in it is read); an override of a key outside ``RESUMABLE``
    is refused by name."""
    if not run_dir.is_dir():
        raise FileNotFoundError(f"--resume {run_dir}: no such run directory")
    faults.check_writable(run_dir)
    owner.enter_context(run_lock.hold(run_dir))
    if not (run_dir / "last.pt").is_file() and not (run_dir / "prev.pt").is_file():
        raise FileNotFoundError(f"--resume {run_dir}: no last.pt there (is it a kd3 run directory?)")
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"--resume {run_dir}: no config.yaml there (is it a kd3 run directory?)")
    saved = load_config(DistillConfig, run_dir / "config.yaml")
    cfg = load_config(DistillConfig, run_dir / "config.yaml", list(overrides))
    for key, old, _ in _differences(saved, cfg):
        if key not in RESUMABLE:
            trained = "without it" if old is _UNSET else f"with {short(old)}"
            raise ConfigError(f"{key} cannot change on resume (the run was trained {trained}); start a new run, or "
                              f"change only {', '.join(RESUMABLE)}")
    return cfg


def train_teacher(cfg: TeacherTrainConfig | str | os.PathLike, overrides: list[str] | tuple[str, ...] = (),
                  resume: Path | None = None, stop_after: int | None = None) -> tuple[Path, TeacherInfo]:
    """Train a teacher on labelled data (crop+flip recipe) and save a kd3 teacher checkpoint.

    ``cfg``: a ``TeacherTrainConfig``, or a preset name / YAML path with ``key=value`` ``overrides``
    (``data``/``val_data``/``test_data`` take SOURCE:SPLIT or your own folder, CSV or .npz).
    Returns the checkpoint's path and its ``TeacherInfo`` (arch, classes, preprocessing, accuracies, sha256)."""
    if not isinstance(cfg, TeacherTrainConfig):
        cfg = load_config(TeacherTrainConfig, cfg, list(overrides))
    preflight.require_model(cfg.model, "model")  # before the run directory exists or any data loads
    preflight.check_train(cfg.train)
    output = expand(cfg.output)
    faults.check_writable(output.parent)  # not after training: the teacher would have nowhere to go
    run_dir = _prepare_run(cfg, resume)
    _setup(cfg.train.seed, cfg.train.threads)
    # Own data (a folder, .csv, .npz) is decoded to image_size × channels; val/test take train's classes by name.
    train = load_labelled(cfg.data, cfg.image_size or None, cfg.channels or None, show_progress=cfg.progress)
    in_channels, image_size = train.images.shape[1], train.images.shape[-1]
    if (cfg.image_size or image_size, cfg.channels or in_channels) != (image_size, in_channels):
        raise ConfigError(f"data={cfg.data} images are {in_channels}×{image_size}×{image_size} (C×H×W), not the "
                          f"image_size={cfg.image_size} channels={cfg.channels} asked for; a SOURCE:SPLIT is not "
                          "resized: leave image_size=0 channels=0")
    val, test = (load_labelled(getattr(cfg, key), image_size, in_channels, train.classes, show_progress=cfg.progress)
                 for key in ("val_data", "test_data"))
    trained = preflight.InputSpec(len(train.classes), tuple(train.images.shape[1:]), f"the teacher trained on data={cfg.data}")
    for key, split in (("val_data", val), ("test_data", test)):
        preflight.require_match(trained, tuple(split.images.shape[1:]), len(split.classes), f"{key}={getattr(cfg, key)}")
    net = create_model(cfg.model, num_classes=len(train.classes), in_channels=in_channels, image_size=image_size)
    device = resolve_device(cfg.train.device)
    ctx = DistillContext(teacher=None, images=train.images, labels=train.labels,
                         normalize=Normalizer(train.mean, train.std),
                         augment=CropFlip(cfg.augment.padding, cfg.augment.flip), num_classes=len(train.classes),
                         epochs=cfg.train.epochs, batch_size=cfg.train.batch_size, device=device,
                         seed=cfg.train.seed, cache_dir=cache_dir(), progress=cfg.progress)
    supervised = get_method("supervised")
    method = supervised(net, ctx, method_options(supervised, {})).to(device)
    trainer = Trainer(method, cfg.train, run_dir, eval_data=test, show_progress=cfg.progress)
    if resume is not None:
        _resume(trainer, run_dir)
    result = trainer.fit(stop_after=stop_after)
    val_result = evaluate(net, val.images, val.labels, ctx.normalize, device)
    info = TeacherInfo(arch=cfg.model, num_classes=len(train.classes), in_channels=in_channels, image_size=image_size,
                       classes=list(train.classes), mean=list(train.mean), std=list(train.std), data=cfg.data,
                       test_accuracy=result.accuracy, val_accuracy=val_result.accuracy, recipe=to_dict(cfg))
    with faults.writing(output, f"the trained weights are in {run_dir / 'last.pt'}"):
        save_teacher(output, net.cpu(), info)
    return output, info


def prepare_teacher(cfg: DistillConfig) -> tuple[Net, TeacherInfo]:
    """Load the configured teacher; train it first (once, cached) when a recipe is given and it is missing.
    Two runs wanting the same missing teacher train it once: the second waits on its lock, then loads it."""
    path = preflight.teacher_path(cfg)

    def train() -> tuple[Net, TeacherInfo]:
        print(f"Teacher {path} not found: training it once from {cfg.teacher.recipe} (cached for later runs)")
        recipe = load_config(TeacherTrainConfig, cfg.teacher.recipe)  # whose output is ``path`` (preflight.teacher_path)
        train_teacher(replace(recipe, output_dir=str(Path(cfg.output_dir) / "teachers"), progress=cfg.progress))
        return load_teacher(path)

    return load_or_build(path, lambda found: load_teacher(found) if found.is_file() else None, train)


def load_pool(cfg: DistillConfig) -> Pool:
    p = cfg.pool
    if p.name == "file":
        if not p.path:
            raise ConfigError("pool.name=file needs pool.path=<the .npz or pool directory written by `kd3 data ingest`>")
        if not Path(p.path).exists():
            raise FileNotFoundError(f"pool.path={p.path} does not exist (write a pool with `kd3 data ingest`)")
        pool = Pool.load(Path(p.path))
    elif p.name == "source":
        if not p.source:
            raise ConfigError("pool.name=source needs pool.source=NAME:SPLIT (e.g. imagenet32:train)")
        pool = Pool.unlabelled(load_source(p.source).images, origin=p.source)
    else:
        pool = load_or_build_pool(p.name, cache_dir(), size=p.size, irrelevant_fraction=p.irrelevant_fraction,
                                  variant=p.variant, seed=p.seed)
    if p.drop_contaminated:
        pool = _drop_contaminated(pool, contamination_source(cfg), cfg.progress)
    if p.oracle:
        if not pool.has_provenance:
            raise ConfigError("pool.oracle=true needs a pool with provenance (a built benchmark pool)")
        pool = pool.subset(np.flatnonzero(pool.relevant))
    return pool


def contamination_source(cfg: DistillConfig) -> str:
    """What ``pool.drop_contaminated`` checks the pool against: SOURCE:SPLIT or the user's own labelled data."""
    against = cfg.pool.contamination_against or cfg.eval_data
    if not against:
        raise ConfigError("pool.drop_contaminated=true needs evaluation images to check against: set eval_data or "
                          "pool.contamination_against=SOURCE:SPLIT (or your own folder / CSV / .npz)")
    return against


def _drop_contaminated(pool: Pool, against: str, show_progress: bool) -> Pool:
    report = pool_contamination(pool, against, duplicates=False, show_progress=show_progress)
    kept = drop_contaminated(pool, report)
    summary = report.summary()
    if distributed.is_main():
        print(f"pool.drop_contaminated: dropped {summary['flagged']} of {len(pool)} pool images that copy {against} "
              f"({summary['exact']} exact, {summary['near']} near copies)")
    return kept


def _provenance(pool: Pool, teacher: Net, normalize: Normalizer, device: torch.device) -> Provenance | None:
    if not pool.has_provenance:
        return None
    predicted = predict_logits(teacher, pool.images, normalize, device).argmax(1).numpy()
    return Provenance(relevant=pool.relevant, source=pool.source,
                      teacher_correct=pool.relevant & (predicted == pool.true_label))


@dataclass
class Checked:
    """What ``check_distillation`` read on the way: reused, so nothing is loaded twice."""

    method_cls: type[Method]
    options: Any
    teacher: preflight.InputSpec
    eval_data: LabelledData | None
    pool: Pool | None  # a file or source pool (cheap to load); None for a builder or original-data method


def check_distillation(cfg: DistillConfig) -> Checked:
    """Every check that can fail a run, done in seconds before a teacher is trained or a pool built."""
    method_cls, options = preflight.check_method(cfg.method)
    preflight.require_model(cfg.student, "student")
    preflight.check_train(cfg.train)
    spec = preflight.teacher_spec(cfg)
    # eval_data="" trains without a test set (a user with a teacher and a pool only): accuracy is unknown.
    # Own eval images are decoded to the teacher's size and channels, their classes matched to its by name.
    eval_data = load_labelled(cfg.eval_data, spec.shape[-1], spec.shape[0], spec.classes or None,
                              show_progress=cfg.progress) if cfg.eval_data else None
    if eval_data is not None:
        preflight.require_match(spec, tuple(eval_data.images.shape[1:]), len(eval_data.classes),
                                f"eval_data={cfg.eval_data}")
    pool = None
    if not method_cls.uses_original_data:
        if cfg.pool.drop_contaminated:
            evaluation_images(contamination_source(cfg), spec.shape)  # a missing or misspelt one fails now, not after the pool
        if cfg.pool.name in ("file", "source"):
            pool = load_pool(cfg)
            preflight.check_pool(pool, spec, preflight.pool_description(cfg.pool))
        else:
            preflight.check_builder(cfg.pool, spec)
        preflight.check_budget(method_cls, options, cfg.train, spec.num_classes,
                               len(pool) if pool is not None else cfg.pool.size, preflight.pool_description(cfg.pool))
    return Checked(method_cls, options, spec, eval_data, pool)


def build_distillation(cfg: DistillConfig, checked: Checked | None = None,
                       ) -> tuple[Method, LabelledData | None, Provenance | None, TeacherInfo]:
    checked = checked or check_distillation(cfg)
    with distributed.main_first():  # rank 0 trains or checks a missing teacher; the others then load it
        teacher, info = prepare_teacher(cfg)
    device = resolve_device(cfg.train.device)
    teacher = teacher.to(device)
    method_cls, options = checked.method_cls, checked.options
    normalize = Normalizer(tuple(info.mean), tuple(info.std))
    provenance, labels = None, None
    if method_cls.uses_original_data:
        original = load_labelled(info.data, info.image_size, info.in_channels, info.classes)
        images, labels = original.images, original.labels
    else:
        with distributed.main_first():  # rank 0 builds a missing pool cache; the others then read it
            pool = checked.pool if checked.pool is not None else load_pool(cfg)
        preflight.check_pool(pool, checked.teacher, preflight.pool_description(cfg.pool))  # a built pool too
        images = pool.images
        provenance = _provenance(pool, teacher, normalize, device)
    eval_data = checked.eval_data
    ctx = DistillContext(teacher=teacher, images=images, labels=labels, normalize=normalize,
                         augment=CropFlip(cfg.augment.padding, cfg.augment.flip), num_classes=info.num_classes,
                         epochs=cfg.train.epochs, batch_size=cfg.train.batch_size, device=device,
                         seed=cfg.train.seed, cache_dir=cache_dir(), progress=cfg.progress and distributed.is_main(),
                         # NaN for an imported teacher (no held-out data of its own): methods then estimate it
                         teacher_accuracy=None if math.isnan(info.val_accuracy) else info.val_accuracy)
    student = create_model(cfg.student, num_classes=info.num_classes, in_channels=info.in_channels,
                           image_size=info.image_size)
    method = method_cls(student, ctx, options).to(device)
    if cfg.train.channels_last:
        method.to(memory_format=torch.channels_last)
        teacher.to(memory_format=torch.channels_last)
    return method, eval_data, provenance, info


def distill_config(config: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> DistillConfig:
    """A distillation config from a preset name (``recommended``, ``fashion-wild/kd3``) or a YAML path,
    with ``key=value`` overrides applied and checked (unknown keys and bad values raise ``ConfigError``)."""
    return load_config(DistillConfig, config, list(overrides))


def distill(cfg: DistillConfig | str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = (),
            resume: Path | None = None, stop_after: int | None = None, allow_changed_inputs: bool = False) -> RunResult:
    """Distil a student from a teacher on a pool of unlabelled images.

    ``cfg``: a ``DistillConfig``, or a preset name / YAML path (then ``overrides`` apply, e.g.
    ``["teacher.checkpoint=teacher.pt", "pool.path=pool/"]``). With ``resume`` (a run directory),
    continue that run from its ``last.pt`` instead (``cfg`` is not used): ``overrides`` may then change
    only ``RESUMABLE`` settings (``train.epochs=N`` continues to N epochs) and are saved to its
    config.yaml; a teacher, pool or eval data that changed since the run started (its inputs.json)
    is refused unless ``allow_changed_inputs``. The process training owns the run directory
    (``kd3.engine.run_lock``): a second one, e.g. a resume while the run is alive, is refused.
    Returns a ``RunResult``: ``run_dir`` (holding ``student.ts`` / ``student.pt2``, ``metrics.jsonl``,
    ``config.yaml``, ``inputs.json``), last-epoch ``accuracy`` ± ``accuracy_se`` on ``eval_data`` (NaN
    without one), ``history``, ``wall_time``, ``images_seen``.
    Raises ``ConfigError`` / ``FileNotFoundError`` / ``ValueError`` for bad input before any work."""
    with ExitStack() as owner:  # holds the run directory's lock until the run returns or fails
        if resume is not None:
            cfg = _resumed_config(Path(resume), overrides, owner)
        elif allow_changed_inputs:
            raise ConfigError("--allow-changed-inputs applies to --resume RUN_DIR only")
        elif not isinstance(cfg, DistillConfig):
            cfg = distill_config(cfg, overrides)
        elif overrides:
            raise TypeError("overrides apply to a preset name or YAML path; change a DistillConfig's fields directly")
        return _distill(cfg, None if resume is None else Path(resume), stop_after, allow_changed_inputs, owner)


def _distill(cfg: DistillConfig, resume: Path | None, stop_after: int | None, allow_changed_inputs: bool,
             owner: ExitStack) -> RunResult:
    checked = check_distillation(cfg)  # before the run directory exists: a bad config leaves nothing behind
    # Under torchrun: join the process group; rank 0 makes the run directory and tells the others.
    distributed.init_from_env(resolve_device(cfg.train.device).type)
    run_dir = distributed.broadcast_object(_prepare_run(cfg, resume, owner) if distributed.is_main() else None)
    _setup(cfg.train.seed, cfg.train.threads)
    pending_inputs = None
    try:
        method, eval_data, provenance, info = build_distillation(cfg, checked)
        inputs = describe_inputs(cfg, info, checked.pool, method.ctx.pool_size, eval_data,
                                 checked.method_cls.uses_original_data)
        if resume is None:
            record_inputs(run_dir, inputs)
            if eval_data is not None and distributed.is_main():
                record_teacher_accuracy(run_dir, method.ctx, eval_data, cfg.eval_data)
        else:  # before the checkpoint is read: its per-image state belongs to the inputs it was trained on
            pending_inputs = check_inputs(run_dir, inputs, allow_changed_inputs)
    except KeyboardInterrupt as stop:  # say this run's state, not that of a teacher it was training
        raise signals.as_interrupted(stop, run_dir, None, 0) from None
    except Exception:  # a check that needed the teacher or the pool failed: a new run leaves nothing behind
        if resume is None and distributed.is_main():
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    trainer = Trainer(method, cfg.train, run_dir, eval_data=eval_data, provenance=provenance,
                      show_progress=cfg.progress)
    if resume is not None:
        _resume(trainer, run_dir, cfg)
        if pending_inputs is not None:  # recorded once the checkpoint has proven to be a run's
            record_inputs(run_dir, *pending_inputs)
    try:
        result = trainer.fit(stop_after=stop_after)
        if result.epochs == cfg.train.epochs and distributed.is_main():
            _deliver(method, info, run_dir, result, len(eval_data.labels) if eval_data is not None else 0)
    except faults.TrainingFailed as failure:
        if distributed.is_main():
            faults.write_failure_note(run_dir, str(failure))
        raise
    return result


def _deliver(method: Method, info: TeacherInfo, run_dir: Path, result: RunResult, eval_count: int) -> None:
    """The shipped student (``export_student``), unless it is no deliverable (``faults.chance_failure``):
    then nothing is exported and ``TrainingFailed`` says why."""
    measured = read_teacher_accuracy(run_dir)  # on the run's own eval data; else the teacher's own record
    teacher_accuracy = measured["accuracy"] if measured is not None else info.val_accuracy
    problem = faults.chance_failure(result.accuracy, eval_count, info.num_classes, teacher_accuracy)
    if problem is not None:
        raise faults.TrainingFailed(f"{problem}; not exported as student.ts (see {run_dir / faults.FAILED_NOTE}); "
                                    f"the weights are in {run_dir / 'last.pt'}")
    export_student(method, info, run_dir)
    (run_dir / faults.FAILED_NOTE).unlink(missing_ok=True)  # from an earlier try of this run


def export_student(method: Method, info: TeacherInfo, run_dir: Path) -> list[Path]:
    """Ship ``method``'s deployable student in ``run_dir``: ``student.ts`` (TorchScript) and
    ``student.pt2`` (torch.export), plus ``student.onnx`` when the onnx package is installed.

    Every file takes uint8 images N×C×H×W (RGB, or grey for C = 1; 0-255; the teacher's image
    size) and returns logits: the teacher's ``/255`` and ``(x - mean) / std`` are inside
    (``kd3.engine.export.ShippedClassifier``), and the metadata (``kd3.engine.export.META_FIELDS``:
    mean, std, classes, shape, input_format, kd3_version, teacher_sha256, method) travels in each
    file. Each is written whole or not at all (temp file, then rename). A format that cannot be
    written (no onnx package, a model torch.export cannot convert) is skipped with one line on
    stderr; student.ts always ships. Returns the files written."""
    model = ShippedClassifier(method.deployable(), info.preprocessing)
    meta = shipped_meta(info.preprocessing, method.name, info.sha256)
    written, notes = ship(model, meta, run_dir, ("torchscript", "export", "onnx"),
                          kept=f"the trained weights are in {run_dir / 'last.pt'}")
    for note in notes:
        print(f"kd3: note: {note}", file=sys.stderr)
    return written


def load_any_model(path: Path) -> ShippedModel:
    """A teacher checkpoint, an exported student (.ts, .pt2, .onnx) or a run directory (its
    student.ts), as a ``kd3.shipped.ShippedModel`` that takes uint8 images (see ``load_model_file``).

    A teacher ``.pt`` loads with ``weights_only=True`` (data only). A ``.ts`` or ``.pt2`` is code by
    nature: it is loaded only because the user named it (or the run directory holding it), so
    pass only files you trust."""
    return load_model_file(path)


def evaluate_file(path: Path, data: str, device: str = "auto") -> EvalResult:
    """Accuracy (± SE) and loss of any model file kd3 writes (``load_any_model``) on labelled data
    ``data`` (SOURCE:SPLIT, a class-folder directory, a path,label .csv or an .npz: see
    ``kd3.data.labelled.load_labelled``, which decodes own images to the model's size and channels
    and maps class names onto the model's), fed uint8 images as the file's contract says."""
    model = load_any_model(path)
    p = model.preprocessing
    labelled = load_labelled(data, p.image_size, p.in_channels, p.classes)
    if tuple(labelled.images.shape[1:]) != (p.in_channels, p.image_size, p.image_size):
        raise ValueError(f"{data} images are {tuple(labelled.images.shape[1:])}, "
                         f"the model expects {(p.in_channels, p.image_size, p.image_size)}")
    if len(labelled.classes) != p.num_classes:
        raise ValueError(f"{data} has {len(labelled.classes)} classes but the model predicts {p.num_classes}; "
                         "evaluate on a split of the model's own classes")
    return model.evaluate(labelled.images, labelled.labels, resolve_device(device))
