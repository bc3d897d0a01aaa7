"""Side-by-side speed measurements, printed as a table (and one JSON object per line with --json).

    python benchmark.py make-data --out /tmp/bench --images 10000   # ImageNet-like JPEGs from real photos
    python benchmark.py compute --json                              # train step, synthetic data on the device
    python benchmark.py loader --data-dir /tmp/bench --workers 8 --seconds 20 --json
    python benchmark.py train --data-dir /tmp/bench --steps 200 --json
    python benchmark.py train --data-dir /tmp/bench --decode gpu --gpu-decode-share 0,0.25,0.5,1
    python benchmark.py gpu-check                                   # all of it on a rented box, in 8 minutes

compute: this project's ResNet-50 against torchvision's, same precision, memory format and batch.
loader: this project's input pipeline against the torchvision reference (ImageFolder + PIL +
RandomResizedCrop + flip + ToTensor + Normalize), same workers and batch size, on the same files.
train: `python train.py` itself on a JPEG folder; img/s and its ratio to compute-only, over
whole epochs and without each epoch's worker start-up; with --decode gpu, for each --gpu-decode-share given.
gpu-check: the above for both models, bf16 and fp16, eager and compiled, two sizes, and every input route, on
generated JPEGs, plus a check that train.py's step loop never waits for the GPU between its sync points;
within --minutes, to measurements/gpu-check-<date>.jsonl and a markdown table (.md) beside it.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from config import UsageError
from data import ImageFolderDataset, TrainBatchSampler, make_loader, usable_cores
from dataset_paths import DatasetLayoutError, check_layout, class_folders
from gpu_check import add_arguments, gpu_check
from gpu_decode import DeviceBatchDecoder, EncodedImageFolderDataset, collate_encoded
from measure import (
    MODELS,
    MeasurementFailed,
    decode_routes,
    environment,
    non_negative_int,
    positive_float,
    positive_int,
    reference_loader,
    shares,
    significant,
    time_loader,
    time_train_script,
    time_train_steps,
    write_dataset,
)
from model import resnet50
from runtime import resolve_device

RESULTS: list[dict] = []
GPU_CHECK = ("Every measurement here on one box, within --minutes: compute-only "
             "(both models, bf16 and fp16, eager and compiled, at --compute-sizes), every input route "
             "alone and under train.py on the same generated JPEGs, and a check that train.py's step "
             "loop never waits for the GPU between its sync points. Writes JSON lines to --out and a "
             "markdown table beside it (.md, and to stderr); exits 1 if a measurement failed.")


def report(args, **row) -> dict:
    RESULTS.append(row)
    if args.json:
        print(json.dumps(row), flush=True)
    return row


def make_data(args) -> None:
    report(args, **write_dataset(args.out, args.images, args.classes))


def compute(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    settings = dict(precision=args.precision, channels_last=args.channels_last, compile=args.compile,
                    batch_size=args.batch_size, image_size=args.image_size, device=device.type)
    best = {}
    # Two interleaved rounds by default, best of each: whichever model ran first would otherwise pay for
    # warming up the allocator and the cuDNN autotuner.
    for _ in range(args.rounds):
        for name in args.models:
            best[name] = max(best.get(name, 0.0), time_train_steps(MODELS[name](), args, device, args.steps))
    for name, img_s in best.items():
        report(args, what="compute", model=name, img_s=significant(img_s),
               ms_step=round(1000 * args.batch_size / img_s, 2), **settings)

def loader(args) -> None:
    root = Path(args.data_dir) / "train"
    classes = class_folders(root) if root.is_dir() else []  # the loader reads train/ alone: no val/ needed
    if not classes:
        raise DatasetLayoutError(f"{root} holds no class folders; the loader benchmark reads "
                                 f"{root}/<class>/*.JPEG (benchmark.py make-data writes such a folder).")
    dataset = EncodedImageFolderDataset if args.decode == "gpu" else ImageFolderDataset
    ours = dataset(root, classes, True, args.image_size, seed=0)
    sampler = TrainBatchSampler(len(ours), args.batch_size, 0, 1, seed=0)
    if args.decode == "gpu":  # workers read files; decode, crop and normalization happen on the device
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        project = make_loader(ours, sampler, args.workers, pin_memory=False, collate_fn=collate_encoded)
        decode = DeviceBatchDecoder(device)

        def finish(batch, labels, skipped):
            images, _, _ = decode.decode_batch(batch, labels, skipped)
            if device.type == "cuda":
                torch.cuda.synchronize()  # the batch counts once the device has made it
            return images

        project_row = {"pipeline": "project-gpu-decode", "decode_device": device.type}
    else:
        project = make_loader(ours, sampler, args.workers, pin_memory=torch.cuda.is_available())
        finish, project_row = None, {"pipeline": "project"}
    reference = reference_loader(root, args.image_size, args.batch_size, args.workers)
    for row, dl, done in ((project_row, project, finish), ({"pipeline": "torchvision"}, reference, None)):
        img_s = time_loader(dl, args.seconds, finish=done)
        report(args, what="loader", **row, workers=args.workers, img_s=significant(img_s),
               img_s_per_worker=significant(img_s / max(args.workers, 1)), image_size=args.image_size)

def train(args) -> None:
    shares = args.gpu_decode_share if args.decode == "gpu" else [1.0]
    rows = [time_train_script(args, share) for share in shares]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.precision, args.channels_last = rows[0]["precision"], device.type == "cuda"
    compute_only = time_train_steps(resnet50(len(check_layout(args.data_dir).classes)), args, device,
                                    args.compute_steps)
    for row in rows:
        report(args, **row, compute_only_img_s=significant(compute_only), ratio=round(row["img_s"] / compute_only, 3),
               steady_ratio=round(row["steady_img_s"] / compute_only, 3))

def model_names(text: str) -> list[str]:
    names = text.split(",")
    if not set(names) <= set(MODELS):
        raise argparse.ArgumentTypeError(f"expected names from {', '.join(MODELS)} separated by commas, got {text!r}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("make-data", "compute", "loader", "train"):
        p = sub.add_parser(name)
        p.add_argument("--json", action="store_true", help="one JSON object per measurement on stdout")
        p.add_argument("--batch-size", type=positive_int, default=256)
        p.add_argument("--image-size", type=positive_int, default=224)
    sub.choices["make-data"].add_argument("--out", type=Path, required=True)
    sub.choices["make-data"].add_argument("--images", type=positive_int, default=10_000, help="train images")
    sub.choices["make-data"].add_argument("--classes", type=positive_int, default=10)
    for name in ("compute", "train"):
        sub.choices[name].add_argument("--precision", default="bf16" if name == "compute" else "auto",
                                       choices=["bf16", "fp16", "fp32", "auto"])
        sub.choices[name].add_argument("--compile", action="store_true")
        sub.choices[name].add_argument("--warmup", type=non_negative_int, default=10)
    sub.choices["compute"].add_argument("--steps", type=positive_int, default=30)
    sub.choices["compute"].add_argument("--no-channels-last", dest="channels_last", action="store_false")
    sub.choices["compute"].add_argument("--models", type=model_names, default=list(MODELS),
                                        help="comma-separated, from " + ", ".join(MODELS))
    sub.choices["compute"].add_argument("--rounds", type=positive_int, default=2,
                                        help="interleaved rounds, best of each")
    for name in ("loader", "train"):
        sub.choices[name].add_argument("--data-dir", type=Path, required=True)
        sub.choices[name].add_argument("--workers", type=non_negative_int, default=max(1, usable_cores() - 1))
    sub.choices["loader"].add_argument("--seconds", type=positive_float, default=20)
    for name in ("loader", "train"):
        sub.choices[name].add_argument("--decode", choices=["cpu", "gpu"] if name == "loader" else decode_routes(),
                                       default="cpu", help="gpu: workers read files, batches are decoded on cuda "
                                                           "(loader: on the cpu without one; train: train.py --decode)")
    sub.choices["train"].add_argument("--steps", type=positive_int, default=100)
    sub.choices["train"].add_argument("--compute-steps", type=positive_int, default=30,
                                      help="timed steps of the compute-only figure it is compared with")
    sub.choices["train"].add_argument("--gpu-decode-share", type=shares, default=[1.0],
                                      help="with --decode gpu: train.py's --gpu-decode-share, or several separated "
                                           "by commas to measure each (e.g. 0,0.25,0.5,1)")
    add_arguments(sub.add_parser("gpu-check", description=GPU_CHECK))
    return parser


def main() -> int:
    parser = build_parser()
    args = parser.parse_args()
    if args.command != "make-data":
        try:  # every measurement would run on the CPU of a GPU box whose torch cannot use its GPUs
            resolve_device("auto")
        except UsageError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    if args.command == "gpu-check":  # its own environment row, in its file too, and a table at the end
        return gpu_check(args)
    if args.json:
        print(json.dumps(environment()), flush=True)
    try:
        {"make-data": make_data, "compute": compute, "loader": loader, "train": train}[args.command](args)
    except (DatasetLayoutError, UsageError) as err:  # e.g. --precision bf16 on a GPU without bf16 hardware
        print(f"error: {err}", file=sys.stderr)
        return 2
    except MeasurementFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print("\n" + "\n".join(" | ".join(f"{k}={v}" for k, v in row.items()) for row in RESULTS), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
