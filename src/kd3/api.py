"""The library entry points the CLI calls: train a teacher, distil a student, evaluate a model."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

import kd3.methods  # noqa: F401  (registers every method)
from kd3 import preflight
from kd3.config import ConfigError, DistillConfig, TeacherTrainConfig, load_config, save_config, to_dict
from kd3.data.augment import CropFlip, Normalizer
from kd3.data.contamination import drop_contaminated, pool_contamination
from kd3.data.pool import Pool
from kd3.data.pools import load_or_build_pool
from kd3.data.sources import LabelledData, load_source
from kd3.engine import checkpoint, distributed, faults, signals
from kd3.engine.evaluate import EvalResult, evaluate, predict_logits
from kd3.engine.export import export_torchscript, load_torchscript
from kd3.engine.trainer import Provenance, RunResult, Trainer, resolve_device
from kd3.methods.base import DistillContext, Method, get_method
from kd3.models import create_model
from kd3.models.base import Net
from kd3.paths import cache_dir, expand
from kd3.preflight import method_options  # also kd3.api.method_options, as before
from kd3.teacher import TeacherInfo, load_teacher, save_teacher
from kd3.utils.filelock import load_or_build
from kd3.utils.safe_load import refuse_unsafe


def new_run_dir(output_dir: str, name: str) -> Path:
    """``<output_dir>/<name>-<time>``, else ``...+1``, ``+2``, ...: ``mkdir`` without ``exist_ok`` is
    the claim (atomic), so runs started in the same second, in any processes, never share one."""
    base = Path(output_dir) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
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


def _setup(train_seed: int, threads: int) -> None:
    if threads:
        torch.set_num_threads(threads)
    checkpoint.seed_everything(train_seed)


def _prepare_run(cfg: Any, resume: Path | None) -> Path:
    """The run directory, proven writable (a read-only or full output_dir fails here, in one line,
    before a teacher is trained or a pool built)."""
    if resume is None:
        run_dir = new_run_dir(cfg.output_dir, cfg.name)
        with faults.writing(run_dir / "config.yaml", "nothing was trained"):
            save_config(cfg, run_dir / "config.yaml")
        return run_dir
    if not (resume / "last.pt").is_file() and not (resume / "prev.pt").is_file():
        raise FileNotFoundError(f"--resume {resume}: no last.pt there (is it a kd3 run directory?)")
    faults.check_writable(resume)
    return resume


def _resume(trainer: Trainer, run_dir: Path) -> None:
    with refuse_unsafe(run_dir / "last.pt", "kd3 run checkpoint"):  # torch.load(weights_only=True) inside
        trainer.resume()


def train_teacher(cfg: TeacherTrainConfig, resume: Path | None = None, stop_after: int | None = None) -> tuple[Path, TeacherInfo]:
    """Train a teacher with labels (crop+flip recipe) and save a checkpoint with its record."""
    preflight.require_model(cfg.model, "model")  # before the run directory exists or any data loads
    preflight.check_train(cfg.train)
    output = expand(cfg.output)
    faults.check_writable(output.parent)  # not after training: the teacher would have nowhere to go
    run_dir = _prepare_run(cfg, resume)
    _setup(cfg.train.seed, cfg.train.threads)
    train, val, test = load_source(cfg.data), load_source(cfg.val_data), load_source(cfg.test_data)
    trained = preflight.InputSpec(len(train.classes), tuple(train.images.shape[1:]), f"the teacher trained on data={cfg.data}")
    for key, split in (("val_data", val), ("test_data", test)):
        preflight.require_match(trained, tuple(split.images.shape[1:]), len(split.classes), f"{key}={getattr(cfg, key)}")
    in_channels, image_size = train.images.shape[1], train.images.shape[-1]
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
        recipe = load_config(TeacherTrainConfig, cfg.teacher.recipe, [f"output={cfg.teacher.checkpoint}"])
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
    """The SOURCE:SPLIT ``pool.drop_contaminated`` checks the pool against."""
    against = cfg.pool.contamination_against or cfg.eval_data
    if not against:
        raise ConfigError("pool.drop_contaminated=true needs evaluation images to check against: set eval_data or "
                          "pool.contamination_against=SOURCE:SPLIT")
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
    eval_data = load_source(cfg.eval_data) if cfg.eval_data else None
    if eval_data is not None:
        preflight.require_match(spec, tuple(eval_data.images.shape[1:]), len(eval_data.classes),
                                f"eval_data={cfg.eval_data}")
    pool = None
    if not method_cls.uses_original_data:
        if cfg.pool.drop_contaminated:
            load_source(contamination_source(cfg))  # a missing or misspelt source fails now, not after the pool
        if cfg.pool.name in ("file", "source"):
            pool = load_pool(cfg)
            preflight.check_pool(pool, spec, preflight.pool_description(cfg.pool))
        else:
            preflight.check_builder(cfg.pool, spec)
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
        original = load_source(info.data)
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
                         teacher_accuracy=info.val_accuracy)
    student = create_model(cfg.student, num_classes=info.num_classes, in_channels=info.in_channels,
                           image_size=info.image_size)
    method = method_cls(student, ctx, options).to(device)
    if cfg.train.channels_last:
        method.to(memory_format=torch.channels_last)
        teacher.to(memory_format=torch.channels_last)
    return method, eval_data, provenance, info


def distill(cfg: DistillConfig, resume: Path | None = None, stop_after: int | None = None) -> RunResult:
    """Distil a student; with ``resume`` continue the run in that directory from its last.pt."""
    if resume is not None:
        cfg = load_config(DistillConfig, resume / "config.yaml")
    checked = check_distillation(cfg)  # before the run directory exists: a bad config leaves nothing behind
    # Under torchrun: join the process group; rank 0 makes the run directory and tells the others.
    distributed.init_from_env(resolve_device(cfg.train.device).type)
    run_dir = distributed.broadcast_object(_prepare_run(cfg, resume) if distributed.is_main() else None)
    _setup(cfg.train.seed, cfg.train.threads)
    try:
        method, eval_data, provenance, info = build_distillation(cfg, checked)
    except KeyboardInterrupt as stop:  # say this run's state, not that of a teacher it was training
        raise signals.as_interrupted(stop, run_dir, None, 0) from None
    trainer = Trainer(method, cfg.train, run_dir, eval_data=eval_data, provenance=provenance,
                      show_progress=cfg.progress)
    if resume is not None:
        _resume(trainer, run_dir)
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
    """``student.ts``, unless the student is no deliverable (``faults.chance_failure``): then nothing
    is exported and ``TrainingFailed`` says why."""
    problem = faults.chance_failure(result.accuracy, eval_count, info.num_classes, info.val_accuracy)
    if problem is not None:
        raise faults.TrainingFailed(f"{problem}; not exported as student.ts (see {run_dir / faults.FAILED_NOTE}); "
                                    f"the weights are in {run_dir / 'last.pt'}")
    path = run_dir / "student.ts"
    with faults.writing(path, f"the trained weights are in {run_dir / 'last.pt'}"):
        export_student(method, info, path)
    (run_dir / faults.FAILED_NOTE).unlink(missing_ok=True)  # from an earlier try of this run


def export_student(method: Method, info: TeacherInfo, path: Path) -> Path:
    """TorchScript with kd3's metadata, written whole or not at all (temp file, then rename)."""
    example = torch.zeros(2, info.in_channels, info.image_size, info.image_size)
    meta = {"mean": info.mean, "std": info.std, "classes": info.classes, "in_channels": info.in_channels,
            "image_size": info.image_size, "method": method.name}
    staged = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        export_torchscript(method.deployable(), example, meta, staged)
        os.replace(staged, path)
    finally:
        staged.unlink(missing_ok=True)
    return path


def load_any_model(path: Path) -> tuple[torch.nn.Module, Normalizer, int, int]:
    """A teacher checkpoint, an exported student (.ts) or a run directory (its student.ts).

    A teacher ``.pt`` loads with ``weights_only=True`` (data only). A ``.ts`` is TorchScript, which
    is code by nature: it is loaded only because the user named it (or the run directory holding
    it), so pass only files you trust."""
    path = Path(path)
    if path.is_dir():
        faults.raise_if_failed(path)
        path = path / "student.ts"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (give a teacher .pt, a student .ts or a finished run directory)")
    if path.suffix == ".ts":
        module, meta = load_torchscript(path)
        return module, Normalizer(tuple(meta["mean"]), tuple(meta["std"])), meta["in_channels"], meta["image_size"]
    net, info = load_teacher(path)
    return net, Normalizer(tuple(info.mean), tuple(info.std)), info.in_channels, info.image_size


def evaluate_file(path: Path, data: str, device: str = "auto") -> EvalResult:
    model, normalize, channels, size = load_any_model(path)
    labelled = load_source(data)
    if tuple(labelled.images.shape[1:]) != (channels, size, size):
        raise ValueError(f"{data} images are {tuple(labelled.images.shape[1:])}, the model expects {(channels, size, size)}")
    with torch.no_grad():  # one blank image tells how many classes any model (teacher or .ts) predicts
        predicted = model(torch.zeros(1, channels, size, size)).shape[-1]
    if predicted != len(labelled.classes):
        raise ValueError(f"{data} has {len(labelled.classes)} classes but the model predicts {predicted}; "
                         "evaluate on a split of the model's own classes")
    dev = resolve_device(device)
    return evaluate(model.to(dev), labelled.images, labelled.labels, normalize, dev)
