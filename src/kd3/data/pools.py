"""Benchmark web pools (see docs/benchmarks.md): shifted relevant images plus irrelevant ones.

Composition is exact, not sampled: ``round(size · irrelevant_fraction)`` irrelevant images
(half-up rounding), the rest relevant; relevant images split over relevant sources and then,
within each source, over styles, and irrelevant images over irrelevant sources, each by
largest-remainder rounding (ties to the first key listed), so every count is a pure function
of the knobs and they sum exactly. The counts are recorded in ``meta['counts']``.

Every random choice draws from a generator seeded by ``(seed, component name)``, so the same
seed gives a byte-identical pool, and changing one share leaves the other parts' draws alone.
"""
from __future__ import annotations

import hashlib
import json
import math
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from kd3.data import irrelevant, render
from kd3.data.pool import UNKNOWN_LABEL, Pool
from kd3.data.shifts import NEEDS_PATCHES, STYLES, apply_style
from kd3.data.sources import load_source
from kd3.data.splits import allocate
from kd3.engine.faults import best_effort
from kd3.utils.filelock import load_or_build

# Bump when a change in generation code alters what a given seed builds: it invalidates caches.
POOL_VERSION = 1

_DEFAULT_STYLES = {"sketch": 0.25, "lowres": 0.25, "blend": 0.2, "contrast": 0.2, "clean": 0.1}
_HARD_STYLES = {"sketch": 0.2, "lowres": 0.2, "blend": 0.15, "contrast": 0.15, "clean": 0.1,
                "negative": 0.1, "mnistm": 0.1}

RECIPES: dict[str, dict[str, dict]] = {
    "fashion-wild": {
        "relevant_mix": {"fashion-r": 1.0},
        "style_mix": {"default": _DEFAULT_STYLES, "hard": _HARD_STYLES},
        "irrelevant_mix": {"natural": 0.2, "faces": 0.2, "noise": 0.2, "mnist": 0.2,
                           "glyphs": 0.2},
    },
    "digits-wild": {
        # The shift is the population (other writers and scanner, printed fonts), not a style.
        "relevant_mix": {"uci-digits": 0.5, "font-digits": 0.5},
        "style_mix": {"default": {"clean": 1.0}},
        "irrelevant_mix": {"fashion": 1 / 3, "letters": 1 / 3, "natural": 1 / 3},
    },
}
_SHAPE = (1, 28, 28)  # both benchmarks are 1×28×28
IMAGE_SHAPE = _SHAPE  # public: a run checks its teacher against it before building a pool


def _rng(seed: int, component: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(component.encode())])


def _draw_cycling(available: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """n indices into ``available`` items, without replacement until every item was used."""
    passes = [rng.permutation(available) for _ in range(-(-n // available))] if n else []
    return np.concatenate(passes)[:n] if passes else np.zeros(0, dtype=np.int64)


def _labelled(spec: str) -> Callable[[int, np.random.Generator], tuple[np.ndarray, np.ndarray]]:
    def draw(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        data = load_source(spec)
        idx = _draw_cycling(len(data), n, rng)
        return data.images.numpy()[idx], data.labels.numpy()[idx]
    return draw


def _font_digits(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, 10, size=n)
    return render.render_centered([str(d) for d in labels], rng), labels.astype(np.int64)


_RELEVANT: dict[str, Callable[[int, np.random.Generator], tuple[np.ndarray, np.ndarray]]] = {
    "fashion-r": _labelled("fashion-mnist:r"),
    "uci-digits": _labelled("uci-digits:train"),
    "font-digits": _font_digits,
}


def _check_mix(kind: str, mix: dict[str, float], known: list[str] | tuple[str, ...]) -> dict:
    unknown = sorted(set(mix) - set(known))
    if unknown:
        raise ValueError(f"unknown {kind} {unknown}; known: {', '.join(known)}")
    return {k: float(v) for k, v in mix.items()}


def resolve_knobs(name: str, *, size: int, irrelevant_fraction: float = 0.7,
                  variant: str = "default", style_mix: dict[str, float] | None = None,
                  irrelevant_mix: dict[str, float] | None = None,
                  relevant_mix: dict[str, float] | None = None, seed: int = 0) -> dict:
    """The complete recipe ``build_pool`` will follow, defaults filled in and checked."""
    if name not in RECIPES:
        raise ValueError(f"unknown pool {name!r}; known: {', '.join(RECIPES)}")
    recipe = RECIPES[name]
    if variant not in recipe["style_mix"]:
        raise ValueError(f"{name} has no variant {variant!r}; known: "
                         f"{', '.join(recipe['style_mix'])}")
    if not (isinstance(size, int) and size >= 0):
        raise ValueError(f"size must be a non-negative int, got {size!r}")
    if not 0.0 <= irrelevant_fraction <= 1.0:
        raise ValueError(f"irrelevant_fraction must be in [0, 1], got {irrelevant_fraction}")
    return {
        "pool": name, "variant": variant, "size": size,
        "irrelevant_fraction": float(irrelevant_fraction), "seed": int(seed),
        "relevant_mix": _check_mix("relevant source", relevant_mix or recipe["relevant_mix"],
                                   list(recipe["relevant_mix"])),
        "style_mix": _check_mix("style", style_mix or recipe["style_mix"][variant], STYLES),
        "irrelevant_mix": _check_mix("irrelevant source",
                                     irrelevant_mix or recipe["irrelevant_mix"],
                                     list(irrelevant.GENERATORS)),
    }


def plan_counts(knobs: dict) -> dict:
    """Exact per-part counts for resolved knobs (what ``meta['counts']`` will say)."""
    n_irr = math.floor(knobs["size"] * knobs["irrelevant_fraction"] + 0.5)
    n_rel = knobs["size"] - n_irr
    per_source = allocate(knobs["relevant_mix"], n_rel)
    source_style = {f"{src}/{style}": k for src, n in per_source.items()
                    for style, k in allocate(knobs["style_mix"], n).items()}
    irr = allocate(knobs["irrelevant_mix"], n_irr)
    styles = {s: sum(source_style[f"{src}/{s}"] for src in per_source) for s in knobs["style_mix"]}
    return {"relevant": n_rel, "irrelevant": n_irr, "source": {**per_source, **irr},
            "style": {**styles, "none": n_irr},
            "source_style": {**source_style, **{f"{s}/none": k for s, k in irr.items()}}}


def build_pool(name: str, *, size: int, irrelevant_fraction: float = 0.7,
               variant: str = "default", style_mix: dict[str, float] | None = None,
               irrelevant_mix: dict[str, float] | None = None,
               relevant_mix: dict[str, float] | None = None, seed: int = 0) -> Pool:
    """Build ``fashion-wild`` or ``digits-wild`` with exactly the requested composition.

    Defaults (``RECIPES``): fashion-wild relevant = fashion-mnist:r images styled sketch 25%,
    lowres 25%, blend 20%, contrast 20%, clean 10% (``variant="hard"`` adds negative and
    mnistm, 10% each); irrelevant = natural, faces, noise, mnist, glyphs, 20% each.
    digits-wild relevant = uci-digits:train and font-rendered digits, half each, clean;
    irrelevant = fashion, letters, natural, a third each. Mixes are relative weights and
    replace the default mix when given.
    """
    knobs = resolve_knobs(name, size=size, irrelevant_fraction=irrelevant_fraction,
                          variant=variant, style_mix=style_mix, irrelevant_mix=irrelevant_mix,
                          relevant_mix=relevant_mix, seed=seed)
    counts = plan_counts(knobs)
    c, h, w = _SHAPE
    parts: list[tuple[np.ndarray, str, str, np.ndarray]] = []  # images, source, style, labels
    for src, n in counts["source"].items():
        if src not in knobs["relevant_mix"] or n == 0:
            continue
        images, labels = _RELEVANT[src](n, _rng(seed, f"relevant/{src}"))
        start = 0
        for style in knobs["style_mix"]:
            k = counts["source_style"][f"{src}/{style}"]
            chunk = images[start:start + k]  # drawn order is random, so chunks are too
            patches = (irrelevant.natural_crops(k, _rng(seed, f"patches/{src}/{style}"), c, h)
                       if style in NEEDS_PATCHES else None)
            styled = apply_style(style, chunk, _rng(seed, f"style/{src}/{style}"), patches)
            parts.append((styled, src, style, labels[start:start + k]))
            start += k
    for src, n in counts["source"].items():
        if src in knobs["irrelevant_mix"] and n:
            images = irrelevant.GENERATORS[src](n, _rng(seed, f"irrelevant/{src}"), c, h)
            parts.append((images, src, "none", np.full(n, UNKNOWN_LABEL, dtype=np.int64)))

    images = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, c, h, w), np.uint8)
    source = np.array([p[1] for p in parts for _ in range(len(p[0]))], dtype=str)
    style = np.array([p[2] for p in parts for _ in range(len(p[0]))], dtype=str)
    labels = np.concatenate([p[3] for p in parts]) if parts else np.zeros(0, np.int64)
    order = _rng(seed, "shuffle").permutation(len(images))
    return Pool(
        images=torch.from_numpy(np.ascontiguousarray(images[order])),
        source=source[order], style=style[order], relevant=(labels[order] != UNKNOWN_LABEL),
        true_label=labels[order].astype(np.int64),
        meta={**knobs, "counts": counts, "image_shape": list(_SHAPE), "provenance": True,
              "version": POOL_VERSION},
    )


def pool_cache_path(name: str, cache_dir: Path, **knobs) -> Path:
    """``<cache_dir>/pools/<name>-<hash>.npz``; the hash covers the resolved recipe, so
    spelling out a default and leaving it out share one file."""
    recipe = {**resolve_knobs(name, **knobs), "version": POOL_VERSION}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_dir) / "pools" / f"{name}-{digest}.npz"


def _cached_pool(path: Path) -> Pool | None:
    if not path.is_file():
        return None
    try:
        return Pool.load(path)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None  # unreadable cache (e.g. disk filled mid-copy): rebuild and overwrite it


def load_or_build_pool(name: str, cache_dir: Path, **knobs) -> Pool:
    """The cached pool for these knobs, built and saved on first use: once, when several processes
    ask at the same time (the others wait on its lock, then read it). A cache that cannot be
    written (full disk) costs a warning, not the run."""
    path = pool_cache_path(name, cache_dir, **knobs)

    def build() -> Pool:
        pool = build_pool(name, **knobs)
        with best_effort(path, "the pool (it is built again next time)"):
            pool.save(path)
        return pool

    return load_or_build(path, _cached_pool, build)
