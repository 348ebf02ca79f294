"""Name -> factory registry for the model zoo, so configs and checkpoints can name architectures.

Every factory has the signature ``(num_classes=10, in_channels=1, image_size=28, **kwargs) -> Net``;
architectures that pool globally accept ``image_size`` and ignore it, so callers never need to
know which ones depend on it.
"""
from __future__ import annotations

from typing import Any, Callable, TypeVar

from kd3.models.base import Net

ModelFactory = Callable[..., Net]
F = TypeVar("F", bound=ModelFactory)

_REGISTRY: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[F], F]:
    """Decorator that registers a factory under ``name``; a second factory with the same name is an error,
    because a silently replaced architecture would load checkpoints into the wrong network."""
    def decorator(factory: F) -> F:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered (by {_REGISTRY[name].__module__})")
        _REGISTRY[name] = factory
        return factory
    return decorator


def create_model(name: str, num_classes: int = 10, in_channels: int = 1, image_size: int = 28,
                 **kwargs: Any) -> Net:
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(list_models())}") from None
    return factory(num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kwargs)


def list_models() -> list[str]:
    return sorted(_REGISTRY)
