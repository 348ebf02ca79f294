"""Name -> factory registry for the model zoo, so configs and checkpoints can name architectures.

Every factory has the signature ``(num_classes=10, in_channels=1, image_size=28, **kwargs) -> Net``;
architectures that pool globally accept ``image_size`` and ignore it, so callers never need to
know which ones depend on it.

Besides the registered names, ``tv:NAME`` builds torchvision's classifier ``NAME`` and ``timm:NAME``
timm's, both untrained (kd3 never downloads weights). ``tv:NAME@NODE`` cuts the torchvision model's
feature map at graph node ``NODE`` (e.g. ``tv:resnet18@layer3``) instead of before its last pooling;
the cut is part of the name because it decides the checkpoint's ``state_dict`` keys.
"""
from __future__ import annotations

import difflib
from typing import Any, Callable, TypeVar

from kd3.models.base import Net

ModelFactory = Callable[..., Net]
F = TypeVar("F", bound=ModelFactory)

_REGISTRY: dict[str, ModelFactory] = {}

TORCHVISION_PREFIX = "tv:"
TIMM_PREFIX = "timm:"
_PREFIX_HINT = ("torchvision classifiers as tv:NAME, timm ones as timm:NAME, your own with "
                "kd3.models.register_model and kd3 --import MODULE")


class UnknownModel(ValueError):
    """A model name nothing can build; ``detail`` is the reason and the fix without the name, for callers that
    phrase the name their own way (``preflight.require_model`` says which config key holds it)."""

    def __init__(self, name: str, detail: str) -> None:
        super().__init__(f"unknown model {name!r}; {detail}")
        self.detail = detail


def register_model(name: str) -> Callable[[F], F]:
    """Decorator that registers a factory under ``name``; a second factory with the same name is an error,
    because a silently replaced architecture would load checkpoints into the wrong network."""
    if name.startswith((TORCHVISION_PREFIX, TIMM_PREFIX)):
        raise ValueError(f"model name {name!r} starts with {name.split(':')[0]}:, which names torchvision/timm models; "
                         "choose another name")

    def decorator(factory: F) -> F:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered (by {_REGISTRY[name].__module__})")
        _REGISTRY[name] = factory
        return factory
    return decorator


def create_model(name: str, num_classes: int = 10, in_channels: int = 1, image_size: int = 28,
                 **kwargs: Any) -> Net:
    """Build ``name`` (a registered name, ``tv:NAME[@NODE]`` or ``timm:NAME``) for ``num_classes`` classes of
    ``in_channels``×``image_size``×``image_size`` images; ``kwargs`` go to the factory / builder."""
    check_model_name(name)
    if name.startswith(TORCHVISION_PREFIX):
        from kd3.models.adapters import from_torchvision

        arch, _, node = name[len(TORCHVISION_PREFIX):].partition("@")
        return from_torchvision(arch, num_classes, in_channels, image_size, feature_node=node or None, **kwargs)
    if name.startswith(TIMM_PREFIX):
        from kd3.models.adapters import from_timm

        return from_timm(name[len(TIMM_PREFIX):], num_classes, in_channels, **kwargs)
    return _REGISTRY[name](num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kwargs)


def check_model_name(name: str) -> None:
    """Raise ``UnknownModel`` (one line, with a did-you-mean) unless ``create_model`` knows ``name``; builds nothing.

    A plain name not registered yet first loads the ``kd3.models`` entry points, so installed user
    architectures are found from Python without the CLI's ``--import``. A ``@NODE`` is checked when the model is built.
    """
    if name.startswith(TORCHVISION_PREFIX):
        _check_torchvision(name[len(TORCHVISION_PREFIX):].partition("@")[0])
    elif name.startswith(TIMM_PREFIX):
        _check_timm(name[len(TIMM_PREFIX):])
    elif name not in _REGISTRY:
        from kd3.models.plugins import load_entry_points

        load_entry_points()
        if name not in _REGISTRY:
            raise UnknownModel(name, f"known: {', '.join(list_models())} ({_PREFIX_HINT}){_did_you_mean(name, list_models())}")


def _check_torchvision(arch: str) -> None:
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)  # classifiers only: no detection/segmentation
    if arch not in names:
        raise UnknownModel(TORCHVISION_PREFIX + arch, f"torchvision has no classifier {arch!r}"
                           f"{_did_you_mean(arch, names, TORCHVISION_PREFIX)} (see torchvision.models.list_models())")


def _check_timm(arch: str) -> None:
    try:
        import timm
    except ImportError:
        raise UnknownModel(TIMM_PREFIX + arch, "timm models need the optional extra: pip install 'kd3[timm]'") from None
    if not timm.is_model(arch):  # also refuses hf-hub: names, which would download
        raise UnknownModel(TIMM_PREFIX + arch, f"timm has no model {arch!r}{_did_you_mean(arch, timm.list_models(), TIMM_PREFIX)}"
                           " (see timm.list_models())")


def _did_you_mean(name: str, candidates: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(name, candidates, n=3)
    return f"; did you mean {' or '.join(repr(prefix + c) for c in close)}?" if close else ""


def list_models() -> list[str]:
    """The registered names (``tv:`` and ``timm:`` names come from torchvision / timm's own lists)."""
    return sorted(_REGISTRY)
