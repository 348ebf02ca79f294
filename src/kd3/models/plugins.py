"""User architectures: modules named with ``--import`` and the ``kd3.models`` entry-point group."""
from __future__ import annotations


def load_plugins(modules: list[str] | tuple[str, ...] = ()) -> None:
    """Import each named module (its ``@register_model`` decorators run) and every installed entry point."""
