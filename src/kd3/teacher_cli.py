"""``kd3 teacher ...``: bring your own trained classifier as a kd3 teacher checkpoint."""
from __future__ import annotations

import argparse
import json
import math
import shlex
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kd3.teacher import TeacherInfo

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SHOWN_CLASSES = 12  # more are counted, not listed, so the summary stays on one screen


def add_teacher_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``kd3 teacher`` and its subcommands."""
    teacher = sub.add_parser("teacher", help="bring your own trained classifier as a kd3 teacher")
    teacher_sub = teacher.add_subparsers(dest="teacher_command", required=True, metavar="{import,show}",
                                         help="import: your weights as a kd3 teacher; show: print a checkpoint's record")

    p = teacher_sub.add_parser("import", help="make a kd3 teacher checkpoint from your model's weights",
                               description="Make a kd3 teacher checkpoint from a state dict (torch.save(model.state_dict(), "
                                           "FILE)) or a full torchvision/timm model (torch.save(model, FILE)). The file is "
                                           "read without running code from it, and the checkpoint is written only once it "
                                           "reproduces the original model's logits.")
    p.add_argument("weights", metavar="WEIGHTS", help="the .pt/.pth file: a state dict (possibly under 'state_dict' or "
                                                      "'model') or a whole torchvision/timm model")
    p.add_argument("--arch", help="the architecture: tv:NAME (torchvision, e.g. tv:resnet18), timm:NAME, or a kd3 / "
                                  "registered name; required for a state dict")
    p.add_argument("--classes", required=True, metavar="FILE_OR_LIST",
                   help="class names in logit order: a text file (one per line), a JSON list file, or a comma list (cat,dog)")
    p.add_argument("--image-size", type=int, required=True, help="side length in pixels of the square images the model takes")
    p.add_argument("--channels", type=int, choices=[1, 3], default=3, help="input channels: 3 (RGB, default) or 1 (grey)")
    p.add_argument("--norm", choices=["imagenet"],
                   help="the normalisation the model was trained with: imagenet = --mean 0.485,0.456,0.406 "
                        "--std 0.229,0.224,0.225")
    p.add_argument("--mean", help="per-channel mean in [0, 1] units (pixels divided by 255), comma list, e.g. 0.5,0.5,0.5")
    p.add_argument("--std", help="per-channel std in [0, 1] units, comma list, e.g. 0.5,0.5,0.5")
    p.add_argument("--feature-node", metavar="NODE",
                   help="torchvision only: the graph node whose output is the feature map kd3's methods read "
                        "(e.g. layer3; default: the input of the last pooling)")
    p.add_argument("--out", required=True, help="the teacher checkpoint to write, e.g. teacher.pt")

    p = teacher_sub.add_parser("show", help="print a teacher checkpoint's record")
    p.add_argument("checkpoint", metavar="CKPT", help="a kd3 teacher checkpoint (.pt)")
    teacher.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    """Run ``kd3 teacher import`` or ``kd3 teacher show``."""
    if args.teacher_command == "import":
        _import(args)
    else:
        from kd3.teacher import read_teacher_info

        path = Path(args.checkpoint)
        info = read_teacher_info(path)
        print(f"teacher   {path}")
        _print_record(info)
        accuracy = ", ".join(f"{name} {_percent(value)}" for name, value in (("val", info.val_accuracy),
                                                                              ("test", info.test_accuracy)))
        print(f"accuracy  {accuracy}")
        print(f"data      {info.data}")
        if info.recipe:
            print(f"recipe    {', '.join(f'{key}={value}' for key, value in info.recipe.items())}")


def _import(args: argparse.Namespace) -> None:
    from kd3.preprocessing import Preprocessing
    from kd3.teacher_import import import_teacher

    mean, std = _normalisation(args)
    preprocessing = Preprocessing(args.image_size, args.channels, mean, std, parse_classes(args.classes))
    path, info = import_teacher(Path(args.weights), args.arch, preprocessing, Path(args.out),
                                feature_node=args.feature_node)
    print(f"imported  {args.weights} as a kd3 teacher")
    _print_record(info)
    print(f"written   {path}")
    print("next: crawl unlabelled images of these classes, then")
    print(f"  kd3 data ingest IMAGE_FOLDER --size {info.image_size} --channels {info.in_channels} --out pool.npz")
    print(f"  kd3 distill recommended teacher.checkpoint={shlex.quote(str(path))} pool.path=pool.npz")


def _print_record(info: TeacherInfo) -> None:
    classes = ", ".join(info.classes[:SHOWN_CLASSES])
    if len(info.classes) > SHOWN_CLASSES:
        classes += f", … (+{len(info.classes) - SHOWN_CLASSES} more)"
    print(f"arch      {info.arch}")
    print(f"classes   {info.num_classes}: {classes}")
    print(f"input     {info.in_channels}×{info.image_size}×{info.image_size} (C×H×W), pixels/255 then "
          f"mean {_numbers(info.mean)}, std {_numbers(info.std)}")
    print(f"sha256    {info.sha256}")


def _normalisation(args: argparse.Namespace) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if args.norm and (args.mean or args.std):
        raise ValueError("give --norm or --mean/--std, not both")
    if args.norm == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    if not (args.mean and args.std):
        raise ValueError("give the normalisation the model was trained with: --norm imagenet, or --mean and --std "
                         "one value per channel (e.g. --mean 0.5,0.5,0.5 --std 0.5,0.5,0.5; 0,0,0 and 1,1,1 for none)")
    mean, std = _floats(args.mean, "--mean"), _floats(args.std, "--std")
    if any(value > 1 for value in mean + std):
        raise ValueError(f"--mean {args.mean} --std {args.std}: give them in [0, 1] units (divide 0-255 values by 255, "
                         "e.g. 123.675 -> 0.485)")
    return mean, std


def _floats(text: str, option: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"{option} {text}: give numbers separated by commas, e.g. 0.485,0.456,0.406") from None


def parse_classes(value: str) -> tuple[str, ...]:
    """Class names from a text file (one per line), a JSON list file, or a comma-separated list."""
    path = Path(value)
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json" or text.lstrip().startswith("["):
            try:
                names = json.loads(text)
            except json.JSONDecodeError as error:
                raise ValueError(f"--classes {path}: not valid JSON ({error})") from None
            if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
                raise ValueError(f"--classes {path}: a JSON file must hold a list of class names (strings)")
        else:
            names = text.splitlines()
        where = f"--classes {path}"
    elif "," not in value and (path.suffix in (".txt", ".json") or "/" in value):
        raise FileNotFoundError(f"--classes {value}: no such file (give a file or a comma list such as cat,dog)")
    else:
        names, where = value.split(","), f"--classes {value}"
    names = [name.strip() for name in names if name.strip()]
    repeated = sorted(name for name, count in Counter(names).items() if count > 1)
    if repeated:
        raise ValueError(f"{where}: {', '.join(repeated)} appear(s) more than once; each logit needs its own name")
    if not names:
        raise ValueError(f"{where}: no class names")
    return tuple(names)


def _numbers(values: list[float]) -> str:
    return ",".join(f"{value:g}" for value in values)


def _percent(value: float) -> str:
    return "not measured" if math.isnan(value) else f"{100 * value:.2f} %"
