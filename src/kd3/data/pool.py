"""The web pool: unlabelled uint8 images plus per-image provenance, saved as a plain ``.npz``.

Provenance (source, style, relevant, true_label) exists so benchmarks can score selection
precision / recall; methods must never read it. Pools ingested from a folder have none:
``meta['provenance']`` is False, ``relevant`` is all False and ``true_label`` all -1.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

UNKNOWN_LABEL = -1
_ARRAYS = ("images", "source", "style", "relevant", "true_label")


@dataclass
class Pool:
    images: torch.Tensor  # uint8 N×C×H×W
    source: np.ndarray  # str per image: "fashion-r", "natural", "faces", ..., "folder"
    style: np.ndarray  # str per image: "clean", "sketch", ..., "none" for irrelevant images
    relevant: np.ndarray  # bool per image
    true_label: np.ndarray  # int64 per image, -1 when unknown
    meta: dict = field(default_factory=dict)  # the knobs and counts that built the pool

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"pool images must be uint8 N×C×H×W, got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        for name in _ARRAYS[1:]:
            if len(getattr(self, name)) != n:
                raise ValueError(f"pool field {name} has {len(getattr(self, name))} entries "
                                 f"for {n} images")

    @classmethod
    def unlabelled(cls, images: torch.Tensor, origin: str, meta: dict | None = None) -> Pool:
        """A pool without provenance (a user's folder, a source with its labels dropped)."""
        n = len(images)
        return cls(images=images, source=np.full(n, origin), style=np.full(n, "none"),
                   relevant=np.zeros(n, dtype=bool), true_label=np.full(n, UNKNOWN_LABEL, dtype=np.int64),
                   meta={"pool": origin, "provenance": False, **(meta or {})})

    def __len__(self) -> int:
        return len(self.images)

    @property
    def has_provenance(self) -> bool:
        return bool(self.meta.get("provenance", True))

    def subset(self, indices: np.ndarray | torch.Tensor | list[int]) -> Pool:
        """The pool restricted to ``indices`` (in that order); meta notes the parent's size,
        because its counts describe the parent, not the subset."""
        idx = np.asarray(indices, dtype=np.int64)
        return Pool(
            images=self.images[torch.from_numpy(idx)],
            source=self.source[idx], style=self.style[idx], relevant=self.relevant[idx],
            true_label=self.true_label[idx], meta={**self.meta, "subset_of": len(self)},
        )

    def group_counts(self) -> dict[tuple[str, str], int]:
        """Number of images per (source, style), in sorted order."""
        return dict(sorted(Counter(zip(self.source.tolist(), self.style.tolist())).items()))

    def digest(self) -> str:
        """SHA-256 over images and provenance: equal digests mean byte-identical pools."""
        h = hashlib.sha256()
        h.update(self.images.numpy().tobytes())
        for name in _ARRAYS[1:]:
            h.update(np.ascontiguousarray(getattr(self, name)).tobytes())
        return h.hexdigest()

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path`` (an ``.npz`` without pickles) atomically, so a reader never sees half
        a file when several processes build the same cached pool."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:  # a file object stops numpy from appending ".npz"
            np.savez(
                f,
                images=self.images.numpy(),
                # Fixed-width unicode arrays load with allow_pickle=False; object arrays would not.
                source=self.source.astype(str), style=self.style.astype(str),
                relevant=self.relevant.astype(bool),
                true_label=self.true_label.astype(np.int64),
                meta=np.array(json.dumps(self.meta, sort_keys=True)),
            )
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Pool:
        with np.load(Path(path), allow_pickle=False) as z:
            return cls(
                images=torch.from_numpy(z["images"]), source=z["source"], style=z["style"],
                relevant=z["relevant"], true_label=z["true_label"],
                meta=json.loads(str(z["meta"])),
            )
