"""What a classifier expects of its input: size, channels, normalisation and class names.

One typed object travels with every teacher checkpoint and every exported student, so nothing
downstream has to guess (or re-derive) how images were prepared.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preprocessing:
    """Images are ``in_channels``×``image_size``×``image_size`` (1 = grey, 3 = RGB), scaled to [0, 1],
    then standardised per channel: ``(x - mean) / std``. ``classes[i]`` names logit ``i``."""

    image_size: int
    in_channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.image_size < 1 or self.in_channels not in (1, 3):
            raise ValueError(f"image_size={self.image_size}, in_channels={self.in_channels}: "
                             "need image_size ≥ 1 and 1 (grey) or 3 (RGB) channels")
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) != self.in_channels:
                raise ValueError(f"{name} has {len(values)} values for {self.in_channels} channel(s); "
                                 "give one per channel, in [0, 1] units (e.g. 0.485,0.456,0.406)")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std={list(self.std)}: every value must be > 0")
        if not self.classes:
            raise ValueError("classes is empty: name every class the model predicts, in logit order")

    @property
    def num_classes(self) -> int:
        return len(self.classes)
