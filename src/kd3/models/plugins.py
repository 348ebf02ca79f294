"""User architectures: modules named with ``--import`` and the ``kd3.models`` entry-point group.

A package makes its architectures known to kd3 without anyone importing it by declaring, in its
``pyproject.toml``, either a module whose ``@register_model`` decorators register them::

    [project.entry-points."kd3.models"]
    my_nets = "my_package.nets"

or one factory per name (registered under the entry point's name)::

    [project.entry-points."kd3.models"]
    my_resnet = "my_package.nets:my_resnet"
"""
from __future__ import annotations

import importlib
import importlib.metadata
import types

from kd3.models import registry

GROUP = "kd3.models"
_entry_points_loaded = False


def load_plugins(modules: list[str] | tuple[str, ...] = ()) -> None:
    """Import each named module (its ``@register_model`` decorators run) and every installed entry point."""
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as error:  # any failure of the user's module is theirs to fix: say which and why, in one line
            raise ValueError(f"--import {module}: cannot import it ({_first_line(error)}); "
                             "give an importable module name (is it on PYTHONPATH?)") from None
    load_entry_points()


def load_entry_points() -> None:
    """Load every ``kd3.models`` entry point, once per process: a module is imported, a callable registered
    under the entry point's name. ``create_model`` calls this on the first name it does not know."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    for entry_point in importlib.metadata.entry_points(group=GROUP):
        where = f"entry point {entry_point.name} = {entry_point.value} (group {GROUP})"
        try:
            target = entry_point.load()
        except Exception as error:  # a broken installed plugin: name it, and how to get rid of it
            raise ValueError(f"{where}: cannot load it ({_first_line(error)}); fix or uninstall the package "
                             "that declares it") from None
        if isinstance(target, types.ModuleType):
            continue  # importing it ran its @register_model decorators
        if not callable(target):
            raise ValueError(f"{where} is a {type(target).__name__}, not a module or a model factory")
        if registry._REGISTRY.get(entry_point.name) is not target:  # a retry after a failed plugin registers once
            registry.register_model(entry_point.name)(target)
    _entry_points_loaded = True  # only now: a broken plugin is reported on every lookup, not once and then forgotten


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
