"""Your own torchvision classifier + your own image folder -> a student shipped as ONNX.

    python examples/distill_own_model.py --teacher resnet18.pth --arch tv:resnet18 --classes classes.txt \
        --images my_crawl/ --labelled my_labelled/ --size 32 --out my_run

``--labelled`` is a folder with one sub-folder per class (named as in classes.txt); it measures the student.
CI runs this at a tiny budget on tiny synthetic data (tests/test_walkthrough.py).
"""
import argparse
import json
from pathlib import Path

import onnxruntime

import kd3

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
for flag, text in [("--teacher", "state dict of your classifier"), ("--arch", "its kd3 model name, e.g. tv:resnet18"),
                   ("--classes", "text file: one class name per line, in logit order"), ("--images", "unlabelled images"),
                   ("--labelled", "labelled held-out folder"), ("--out", "folder for everything written")]:
    parser.add_argument(flag, required=True, help=text)
parser.add_argument("--size", type=int, default=32, help="the teacher's input side in pixels")
parser.add_argument("--epochs", type=int, default=20, help="distillation epochs")
parser.add_argument("--steps", type=int, default=0, help="optimizer steps per epoch (0: one pass over the kept images)")
parser.add_argument("--batch-size", type=int, default=128, help="images per optimizer step")
parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other kd3 distill override")
args = parser.parse_args()
out = Path(args.out)

classes = tuple(Path(args.classes).read_text().split())
imagenet = kd3.Preprocessing(args.size, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), classes)
teacher, _ = kd3.import_teacher(args.teacher, args.arch, imagenet, out / "teacher.pt")
kd3.ingest(args.images, size=args.size, channels=3, out=out / "pool")
result = kd3.distill("recommended", overrides=[f"teacher.checkpoint={teacher}", f"pool.path={out / 'pool'}",
                                               f"eval_data={args.labelled}", f"output_dir={out / 'runs'}",
                                               f"train.epochs={args.epochs}", f"train.epoch_steps={args.steps}",
                                               f"train.batch_size={args.batch_size}", *args.set])
onnx_file = next(path for path in kd3.export(result.run_dir, formats=("onnx",)) if path.suffix == ".onnx")

# What a deployment does: raw uint8 images in, logits out; the class names travel in the file.
session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
names = json.loads(session.get_modelmeta().custom_metadata_map["classes"])
held_out = kd3.load_labelled(args.labelled, args.size, 3, classes)
logits = session.run(None, {session.get_inputs()[0].name: held_out.images.numpy()})[0]
accuracy = float((logits.argmax(1) == held_out.labels.numpy()).mean())
print(f"{onnx_file}: {100 * accuracy:.2f}% on {len(held_out)} images of {args.labelled}; classes {names}")
