"""Bring your own trained classifier as a kd3 teacher checkpoint (``kd3 teacher import``).

The weights come as a state dict (a file from ``torch.save(model.state_dict(), f)``, or a dict in
memory), a full torchvision / timm model (``torch.save(model, f)``, or the ``nn.Module`` itself).
A file is read with ``torch.load(weights_only=True)``, so nothing in it runs: a full model file may
reference only torch.nn / torchvision / timm module classes, and any other global is refused by
name before anything is unpickled. The teacher is written only after it is shown to reproduce the
original model's logits, so a checkpoint that exists is one that works.
"""
from __future__ import annotations

import copy
import enum
import hashlib
import importlib
import math
import pickle
import re
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Union, cast

import torch
from torch import nn

from kd3.engine.checkpoint import state_sha256
from kd3.models.adapters import TimmNet, from_torchvision, timm_classifier, torchvision_classifier
from kd3.models.base import Net
from kd3.models.registry import TIMM_PREFIX, TORCHVISION_PREFIX, check_model_name, create_model
from kd3.preprocessing import Preprocessing
from kd3.teacher import TeacherInfo, save_teacher
from kd3.utils.safe_load import UnsafeFileError

Source = Union[str, Path, nn.Module, Mapping[str, torch.Tensor]]

# Where a full model file's classes may come from: the packages whose models kd3 can rebuild by name.
ALLOWED_PACKAGES = ("torch.nn.", "torchvision.models.", "torchvision.ops.", "timm.")
# torchvision and timm keep builder arguments such as ``norm_layer=partial(nn.LayerNorm, eps=1e-6)`` on their
# modules; a partial only binds arguments to a callable that must itself be allowed, so it can call nothing else.
HARMLESS_GLOBALS = {"functools.partial"}
# Where training scripts nest the weights in a checkpoint dict ("model" may also hold the whole module).
STATE_KEYS = ("state_dict", "model", "model_state_dict")
WHAT = "state dict or torchvision/timm model"
TOLERANCE = 1e-5  # the same weights and input on the same device: logits agree to rounding, or the weights did not land


def import_teacher(source: Source, arch: str | None, preprocessing: Preprocessing, out: str | Path, *,
                   feature_node: str | None = None) -> tuple[Path, TeacherInfo]:
    """Make a kd3 teacher checkpoint at ``out`` from ``source`` and return its path and record.

    ``arch`` is a kd3 model name (``tv:resnet18``, ``timm:resnet18``, ``lenet5_bn``, a registered one);
    it may be ``None`` only for a timm model, which names its own architecture. The model is built for
    ``preprocessing``'s classes and input, the weights are loaded strictly, and ``feature_node`` (a
    torchvision graph node such as ``"layer3"``) moves the feature map kd3's methods read to that node.
    Nothing is written unless a blank batch gives one logit per class and the rebuilt checkpoint
    reproduces the original model's logits on a random batch.
    """
    out = Path(out)
    if isinstance(source, (str, Path)) and out.resolve() == Path(source).resolve():
        raise ValueError(f"the output {out} is the weights file itself; write the teacher to another file")
    content, origin, data, digest = _read_source(source)
    arch = _arch(arch, content, origin, feature_node)
    check_model_name(arch)
    raw = _raw_model(arch, preprocessing)
    reference = copy.deepcopy(content).cpu().eval() if isinstance(content, nn.Module) else None  # the caller's stays as is
    state = _without_parallel_prefix(content if reference is None else reference.state_dict(), raw.state_dict())
    net = _wrap(arch, raw, preprocessing)
    _load_strictly(raw, net, state, arch, preprocessing, origin)
    if reference is None:  # the original is the weights as torch itself loads them, into a model of their own
        reference = _raw_model(arch, preprocessing)
        reference.load_state_dict(state)
        reference.eval()
    net.eval()
    _check(net.state_dict(), reference, arch, preprocessing, origin)
    info = TeacherInfo(arch=arch, num_classes=preprocessing.num_classes, in_channels=preprocessing.in_channels,
                       image_size=preprocessing.image_size, classes=list(preprocessing.classes),
                       mean=[float(m) for m in preprocessing.mean], std=[float(s) for s in preprocessing.std],
                       data=f"imported:{data}", test_accuracy=math.nan, val_accuracy=math.nan,
                       recipe={"imported_from": origin, "source_sha256": digest})
    save_teacher(out, net, info)
    return out, info


# --- reading the source ------------------------------------------------------------------------------

def _read_source(source: Source) -> tuple[nn.Module | dict[str, torch.Tensor], str, str, str]:
    """(model or state dict, how messages name it, what ``TeacherInfo.data`` names it, its sha256)."""
    if isinstance(source, nn.Module):
        state = {k: v.detach().cpu() for k, v in source.state_dict().items()}
        return source, f"the {type(source).__name__} given", f"in-memory {type(source).__name__}", state_sha256(state)
    if isinstance(source, Mapping):
        content = _unwrap(source, "the state dict given")
        state = content.state_dict() if isinstance(content, nn.Module) else content
        return content, "the state dict given", "in-memory state dict", state_sha256(state)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    return _unwrap(read_weights_file(path), str(path)), str(path), path.name, _file_sha256(path)


def read_weights_file(path: Path) -> Any:
    """``torch.load(weights_only=True)`` admitting, beyond tensors and containers, only the module classes of
    torch.nn, torchvision and timm; a file referencing anything else is refused by name, with nothing run."""
    try:
        unlisted = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (ValueError, RuntimeError, zipfile.BadZipFile):
        unlisted = []  # an old-format (non-zip) file: torch.load's own allowlist alone decides, and refuses by name
    allowed = {name: _allowed_global(path, name) for name in unlisted}
    while True:
        try:
            with torch.serialization.safe_globals(list(allowed.values())):
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            # A global the listing could not see (an old-format file): admit it if allowed and read again.
            named = re.search(r"GLOBAL ([\w.]+)", str(error))
            if not named or named.group(1) in allowed:
                raise ValueError(f"cannot read {path} as weights ({_torch_reason(error)}); save them with "
                                 "torch.save(model.state_dict(), FILE) and import that with --arch") from None
            allowed[named.group(1)] = _allowed_global(path, named.group(1))
        except (RuntimeError, EOFError, zipfile.BadZipFile) as error:  # damaged or not a torch file at all
            raise ValueError(f"cannot read {path} as a torch.save file ({_torch_reason(error)})") from None


def _allowed_global(path: Path, name: str) -> Any:
    """The object ``name`` stands for, if a model file may reference it; else ``UnsafeFileError`` naming it."""
    found = _resolve(name) if name.startswith(ALLOWED_PACKAGES) or name in HARMLESS_GLOBALS else None
    # Classes only, and under their own name: a function or an alias (``torch.nn.functional.torch.load``) could
    # be called with the file's arguments; a module class's constructor only builds a layer.
    if name in HARMLESS_GLOBALS or (isinstance(found, type) and issubclass(found, (nn.Module, enum.Enum))
                                    and f"{found.__module__}.{found.__qualname__}" == name):
        return found
    raise _refusal(path, name)


def _refusal(path: Path, name: str) -> UnsafeFileError:
    return UnsafeFileError(f"refusing to load {path}: it references {name}, which is not a torch.nn, torchvision or "
                           "timm module class, so it could run code from outside them (nothing was run); save the "
                           "weights alone with torch.save(model.state_dict(), FILE) and import that with --arch")


def _resolve(name: str) -> Any:
    """Import the longest importable module prefix of ``name`` and look the rest up as attributes; None if absent."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            found: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attribute in parts[cut:]:
            found = getattr(found, attribute, None)
        return found
    return None


def _unwrap(content: Any, origin: str) -> nn.Module | dict[str, torch.Tensor]:
    """The model, or the tensors by parameter name, from what was loaded (possibly nested under STATE_KEYS)."""
    if isinstance(content, nn.Module):
        return content
    if not isinstance(content, Mapping):
        raise ValueError(f"{origin} holds a {type(content).__name__}, not a {WHAT}")
    if content and all(isinstance(v, torch.Tensor) for v in content.values()):
        return dict(content)
    for key in STATE_KEYS:
        if isinstance(content.get(key), (Mapping, nn.Module)):
            return _unwrap(content[key], f"{origin}[{key!r}]")
    raise ValueError(f"{origin} is a dict of {_few([str(k) for k in content])}, not a state dict (tensors by parameter "
                     f"name) nor one under {' / '.join(map(repr, STATE_KEYS))}")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _arch(arch: str | None, content: nn.Module | dict[str, torch.Tensor], origin: str, feature_node: str | None) -> str:
    if arch is None:
        named = getattr(content, "pretrained_cfg", {}).get("architecture") if isinstance(content, nn.Module) else None
        if named is None:
            raise ValueError(f"{origin}: give the architecture (--arch), e.g. tv:resnet18, timm:resnet18 or a "
                             "registered kd3 name; only a timm model names its own")
        arch = TIMM_PREFIX + named
    if feature_node is None:
        return arch
    if not arch.startswith(TORCHVISION_PREFIX) or "@" in arch:
        raise ValueError(f"--feature-node {feature_node} applies to torchvision models (tv:NAME) only, not {arch}")
    return f"{arch}@{feature_node}"


# --- building, loading, checking ---------------------------------------------------------------------

def _raw_model(arch: str, preprocessing: Preprocessing) -> nn.Module:
    """The module whose own ``state_dict`` keys the weights use: torchvision's or timm's model for ``tv:`` /
    ``timm:`` names, kd3's network itself for the others; untrained, for the given classes and channels."""
    n, channels, size = preprocessing.num_classes, preprocessing.in_channels, preprocessing.image_size
    if arch.startswith(TORCHVISION_PREFIX):
        return torchvision_classifier(arch[len(TORCHVISION_PREFIX):].partition("@")[0], n, channels)
    if arch.startswith(TIMM_PREFIX):
        return timm_classifier(arch[len(TIMM_PREFIX):], n, channels)
    with _one_line(f"{arch} cannot take {channels}×{size}×{size} input"):
        return create_model(arch, n, channels, size)


def _wrap(arch: str, raw: nn.Module, preprocessing: Preprocessing) -> Net:
    """The kd3 network around ``raw``, sharing its modules, as ``create_model(arch)`` builds it."""
    size = preprocessing.image_size
    if arch.startswith(TORCHVISION_PREFIX):
        with _one_line(f"{arch} cannot take {preprocessing.in_channels}×{size}×{size} input"):
            return from_torchvision(raw, image_size=size, feature_node=arch.partition("@")[2] or None)
    if arch.startswith(TIMM_PREFIX):
        return TimmNet(raw)
    return cast(Net, raw)  # a kd3 name: _raw_model built the Net itself


def _without_parallel_prefix(state: dict[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys saved from ``DataParallel`` / ``DistributedDataParallel`` start with ``module.``; the model's do not."""
    if state and all(k.startswith("module.") for k in state) and not any(k.startswith("module.") for k in expected):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def _load_strictly(raw: nn.Module, net: Net, state: dict[str, torch.Tensor], arch: str,
                   preprocessing: Preprocessing, origin: str) -> None:
    """Load every tensor of ``state`` into ``raw``, or say in one line which names and shapes do not fit."""
    expected = raw.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    paths = {id(module): path for path, module in raw.named_modules()}
    head, stem = paths.get(id(net.classifier)), paths.get(id(_first_conv(raw)))
    problems = [f"missing {_few(missing)}"] if missing else []
    problems += [f"unexpected {_few(unexpected)}"] if unexpected else []
    for key, need in expected.items():
        if key in state and state[key].shape != need.shape:
            owner = key.rpartition(".")[0]
            wants = (f"the {preprocessing.num_classes} classes need" if owner == head else
                     f"{preprocessing.in_channels}-channel input needs" if owner == stem and key.endswith(".weight") else
                     f"{arch} needs")
            problems.append(f"{key} is {_shape(state[key])}, {wants} {_shape(need)}")
    if problems:
        raise ValueError(f"{origin} does not fit {arch} for {preprocessing.num_classes} classes of "
                         f"{preprocessing.in_channels}-channel input: {'; '.join(problems)} "
                         "(check --arch, --classes and --channels)")
    raw.load_state_dict(state, strict=True)


def _check(saved_state: dict[str, torch.Tensor], reference: nn.Module, arch: str, preprocessing: Preprocessing,
           origin: str) -> None:
    """Rebuild the teacher as ``load_teacher`` will, from the state about to be saved, and prove it works."""
    n, channels, size = preprocessing.num_classes, preprocessing.in_channels, preprocessing.image_size
    rebuilt = create_model(arch, n, channels, size)
    rebuilt.load_state_dict(saved_state)
    rebuilt.eval()
    if rebuilt.num_classes != n:
        raise ValueError(f"{arch}'s head has {rebuilt.num_classes} outputs but {n} class names were given")
    random_batch = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), _one_line(f"{arch} cannot run on {channels}×{size}×{size} input"):
        blank = rebuilt(torch.zeros(2, channels, size, size))
        imported, original = rebuilt(random_batch), reference(random_batch)
    if blank.shape != (2, n) or not torch.isfinite(blank).all():
        raise ValueError(f"{arch} gives {_shape(blank)} logits{'' if torch.isfinite(blank).all() else ' (not finite)'} "
                         f"for a blank 2×{channels}×{size}×{size} batch, not 2×{n}")
    if original.shape != imported.shape or not torch.allclose(imported, original, rtol=TOLERANCE, atol=TOLERANCE):
        difference = (imported - original).abs().max().item() if original.shape == imported.shape else math.inf
        raise ValueError(f"the imported {arch} does not reproduce {origin}: logits differ by up to {difference:.3g} on a "
                         "random batch (is --arch the model the weights were trained as?)")


@contextmanager
def _one_line(what: str) -> Iterator[None]:
    """A model that cannot run on the configured input fails inside torch with a long message: keep its first line."""
    try:
        yield
    except RuntimeError as error:
        raise ValueError(f"{what} ({_first_line(error)})") from None


def _first_conv(model: nn.Module) -> nn.Module | None:
    return next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)


def _shape(tensor: torch.Tensor) -> str:
    return "×".join(str(s) for s in tensor.shape) or "a scalar"


def _few(names: list[str], shown: int = 4) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _torch_reason(error: BaseException) -> str:
    """torch's own reason, without the advice to turn weights_only off that leads its refusals."""
    reason = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(error)) or re.search(r"Unsupported[^\n]*", str(error))
    return reason.group(reason.lastindex or 0) if reason else _first_line(error)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
