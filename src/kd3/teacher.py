"""Teacher checkpoints: the weights plus everything needed to use them without guessing.

A checkpoint records architecture, classes, input size/channels, normalisation, the recipe that
trained it, its accuracies and a sha256 of its weights, and loads with ``weights_only=True``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kd3.engine import checkpoint
from kd3.models import create_model
from kd3.models.base import Net
from kd3.preprocessing import Preprocessing
from kd3.utils.safe_load import refuse_unsafe


@dataclass
class TeacherInfo:
    """A teacher's record. ``mean``/``std`` are per channel in [0, 1] units (images are divided by 255
    first); ``data`` names what it was trained on (``imported:...`` for a teacher brought with
    ``kd3 teacher import``); accuracies are fractions in [0, 1], NaN when unknown."""

    arch: str
    num_classes: int
    in_channels: int
    image_size: int
    classes: list[str]
    mean: list[float]
    std: list[float]
    data: str  # the labelled split it was trained on, e.g. fashion-mnist:o-train
    test_accuracy: float
    val_accuracy: float
    recipe: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""

    @property
    def preprocessing(self) -> Preprocessing:
        """What the teacher expects of an image, as one typed object."""
        return Preprocessing(self.image_size, self.in_channels, tuple(self.mean), tuple(self.std), tuple(self.classes))


def save_teacher(path: Path, net: Net, info: TeacherInfo) -> None:
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    info.sha256 = checkpoint.state_sha256(state)
    checkpoint.atomic_save({"kd3_teacher": 1, "info": vars(info), "state_dict": state}, path)


def _read_record(path: Path) -> tuple[dict[str, Any], TeacherInfo]:
    with refuse_unsafe(path, "kd3 teacher checkpoint"):
        record = checkpoint.load(path)
    if not isinstance(record, dict) or "kd3_teacher" not in record:
        raise ValueError(f"{path} is not a kd3 teacher checkpoint (make one with `kd3 train-teacher CONFIG`)")
    try:
        return record, TeacherInfo(**record["info"])
    except TypeError as error:  # fields missing or unknown: written by something else
        raise ValueError(f"{path} is not a kd3 teacher checkpoint: its record does not fit ({error})") from None


def read_teacher_info(path: Path) -> TeacherInfo:
    """The record alone (classes, input shape, ...): what a run is checked against before it starts."""
    return _read_record(path)[1]


def load_teacher(path: Path) -> tuple[Net, TeacherInfo]:
    """Load, verify the checksum, and return the network in eval mode with gradients off."""
    record, info = _read_record(path)
    actual = checkpoint.state_sha256(record["state_dict"])
    if actual != info.sha256:
        raise ValueError(f"{path}: weights checksum {actual[:12]} does not match the recorded {info.sha256[:12]}; "
                         "the file is corrupt or was edited")
    net = create_model(info.arch, num_classes=info.num_classes, in_channels=info.in_channels,
                       image_size=info.image_size)
    net.load_state_dict(record["state_dict"])
    net.eval().requires_grad_(False)
    return net, info
