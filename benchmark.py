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
import csv
import functools
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

from config import Config, UsageError
from data import ImageFolderDataset, TrainBatchSampler, list_samples, make_loader, usable_cores
from dataset_paths import DatasetLayoutError, check_layout, class_folders
from engine import build_training, train_step
from gpu_decode import DeviceBatchDecoder, EncodedImageFolderDataset, collate_encoded
from model import resnet50
from runtime import Runtime, resolve_device, resolve_precision

REPO = Path(__file__).resolve().parent
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


def environment() -> dict:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"what": "environment", "torch": torch.__version__, "torchvision": torchvision.__version__,
            "gpu": gpu, "cpus": os.cpu_count(), "machine": platform.platform(), "python": platform.python_version()}


# ------------------------------------------------------------------------------------------------- make-data

@functools.cache
def sample_photo(name: str) -> np.ndarray:
    """Read once per process: decoding it took about a third of each image's time."""
    from sklearn.datasets import load_sample_image

    return load_sample_image(name)


def write_image(job: tuple[Path, int]) -> int:
    """One JPEG of ImageNet's typical size (500x375, one in ten larger), cut from a real photograph at a
    random position and scale, with sensor-like noise so it compresses like a camera photo (~100 KB)."""
    path, seed = job
    rng = np.random.default_rng(seed)
    photo = sample_photo(["china.jpg", "flower.jpg"][seed % 2])  # 427x640 RGB
    width, height = (500, 375) if rng.random() < 0.9 else (1000, 750)
    if rng.random() < 0.5:
        width, height = height, width
    crop_h, crop_w = int(rng.integers(200, 427)), int(rng.integers(250, 640))
    top, left = int(rng.integers(0, 428 - crop_h)), int(rng.integers(0, 641 - crop_w))
    img = Image.fromarray(photo[top:top + crop_h, left:left + crop_w]).resize((width, height), Image.BICUBIC)
    pixels = np.asarray(img, dtype=np.float32) + rng.normal(0, 6, (height, width, 3))
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)
    return path.stat().st_size


def write_dataset(out: Path, images: int, classes: int, deadline: float = math.inf) -> dict:
    """train/ and val/ (a tenth as many) of ImageNet-like JPEGs in `classes` folders. At the deadline
    (time.monotonic()) it stops with what it has: val comes first and the classes take turns, so every class
    has images in both splits."""
    jobs = []
    for split, count in (("val", max(classes, images // 10)), ("train", images)):
        for i in range(count):
            folder = Path(out) / split / f"n{i % classes:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            jobs.append((folder / f"{split}_{i:07d}.JPEG", 2 * i + (split == "val")))
    pool = ProcessPoolExecutor()
    try:
        for _ in pool.map(write_image, jobs, chunksize=max(1, min(64, len(jobs) // (4 * usable_cores())))):
            if time.monotonic() > deadline:
                break
    finally:
        pool.shutdown(cancel_futures=True)  # the chunks under way are finished
    sizes = [path.stat().st_size for path, _ in jobs if path.exists()]
    return {"what": "make-data", "out": str(out), "images": len(sizes), "mean_kb": round(np.mean(sizes) / 1024, 1)}


def make_data(args) -> None:
    report(args, **write_dataset(args.out, args.images, args.classes))


# ------------------------------------------------------------------------------------------------- compute

def time_train_steps(model, args, device, steps: int) -> float:
    """img/s of train.py's step (engine.train_step) on one fixed synthetic batch, timed with CUDA events."""
    cfg = Config(precision=args.precision, compile=args.compile, lr=0.01)
    training = build_training(model, cfg, Runtime(device=device), channels_last=args.channels_last)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, training.raw_model.fc.out_features, (args.batch_size,), device=device)
    for step in range(args.warmup):
        train_step(training, x, y, cfg.lr, step)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for step in range(steps):
        train_step(training, x, y, cfg.lr, step)
    sync()
    return steps * args.batch_size / (time.perf_counter() - start)


def significant(value: float, digits: int = 4) -> float:
    """Rounded to a number of significant digits, so that a rate keeps the same relative precision at 0.7 img/s
    on a CPU and at 7,000 on a GPU."""
    return float(f"{value:.{digits}g}")


MODELS = {"project": resnet50, "torchvision": torchvision.models.resnet50}


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


# ------------------------------------------------------------------------------------------------- loader

def time_loader(loader, seconds: float, warmup_batches: int = 3, finish=None) -> float:
    """img/s of `loader`; finish(images, labels, skipped), if given, is the work the training process still
    does per batch and returns its images."""
    def endless():  # small folders end an epoch within the measurement; start the next one at once
        while True:
            for batch in loader:  # the project's (images, labels, skipped) or the reference's (images, labels)
                yield finish(*batch) if finish else batch[0]

    batches = endless()
    for _ in range(warmup_batches):  # worker start-up is not throughput
        next(batches)
    images, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        images += len(next(batches))
    return images / (time.perf_counter() - start)


def reference_loader(root: Path, image_size: int, batch_size: int, workers: int) -> torch.utils.data.DataLoader:
    """The torchvision reference: ImageFolder + PIL + RandomResizedCrop + flip + ToTensor + Normalize."""
    from torchvision import transforms

    dataset = torchvision.datasets.ImageFolder(root, transforms.Compose([
        transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]))
    return torch.utils.data.DataLoader(dataset, batch_size, shuffle=True, num_workers=workers,
                                       pin_memory=torch.cuda.is_available(), drop_last=True)


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


# ------------------------------------------------------------------------------------------------- train

class MeasurementFailed(Exception):
    """A program being measured failed (its own output says why) or ran out of time."""


class OutOfTime(MeasurementFailed):
    pass


def run_until(command: list[str], deadline: float = math.inf, **popen_kwargs) -> int:
    """The exit status of `command`; at the deadline (time.monotonic()) it and its children get SIGTERM (train.py
    then saves and stops), then SIGKILL after STOP_GRACE_SECONDS, and OutOfTime is raised."""
    proc = subprocess.Popen(command, start_new_session=True, **popen_kwargs)  # a group, to reach its children
    try:
        return proc.wait(timeout=max(deadline - time.monotonic(), 0) if deadline < math.inf else None)
    except subprocess.TimeoutExpired:
        stop_group(proc)
        raise OutOfTime(f"stopped at its time cap: {' '.join(command)}") from None
    except BaseException:  # Ctrl-C reaches only this process now that the child has its own session
        stop_group(proc)
        raise


STOP_GRACE_SECONDS = 10


def stop_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:  # already gone
        pass


def decode_routes() -> list[str]:
    """The --decode values train.py accepts, read from its Config so that a new route shows up here."""
    return next(f for f in fields(Config) if f.name == "decode").metadata["choices"]


def time_train_script(args, share: float, deadline: float = math.inf) -> dict:
    """`python train.py` on --data-dir, one GPU: one warm-up epoch, then whole epochs covering --steps, read
    back from the run's metrics.csv. steady_img_s leaves out each epoch's first batch, which waits for the
    loader workers to start: an ImageNet epoch (5,004 steps) pays that once, a benchmark epoch often enough
    to hide the steady rate."""
    per_epoch = len(list_samples(Path(args.data_dir) / "train", check_layout(args.data_dir).classes)[1]) // \
        args.batch_size
    epochs = 1 + -(-args.steps // max(per_epoch, 1))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if torch.cuda.device_count() > 1:  # train.py would spread over every GPU; compute-only uses one
        env["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, str(Path(__file__).with_name("train.py")), "--data-dir", str(args.data_dir),
                   "--output-dir", out, "--epochs", str(epochs), "--batch-size", str(args.batch_size),
                   "--image-size", str(args.image_size), "--workers", str(args.workers), "--precision",
                   args.precision, "--decode", args.decode, "--gpu-decode-share", str(share),
                   *(["--compile"] if args.compile else [])]
        # train.py's progress bar and log go to stderr: stdout is for results.
        if run_until(command, deadline, stdout=sys.stderr, env=env):
            raise MeasurementFailed(f"train.py failed ({' '.join(command)})")
        with open(Path(out) / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))[1:]
    images = sum(int(r["train_images"]) for r in rows)
    seconds = sum(float(r["epoch_seconds"]) for r in rows)
    first = sum(float(r["first_batch_seconds"]) for r in rows)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    decode = args.decode if device == "cuda" else "cpu"  # train.py's own fallback without a GPU
    return {"what": "train", "img_s": significant(images / seconds),
            "steady_img_s": significant((images - len(rows) * args.batch_size) / (seconds - first)),
            "data_wait_pct": round(float(np.mean([float(r["data_wait_pct"]) for r in rows])), 1),
            "steps": images // args.batch_size, "batch_size": args.batch_size, "image_size": args.image_size,
            "workers": args.workers, "precision": resolve_precision(args.precision, torch.device(device)),
            "compile": args.compile, "decode": decode, **({"gpu_decode_share": share} if decode == "gpu" else {})}


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


def bounded(kind: type, minimum: float, exclusive: bool = False):
    """An argparse type: a finite `kind` of at least `minimum` (above it, with exclusive)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value < minimum or (exclusive and value == minimum):
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what} {'above' if exclusive else 'of at least'} {minimum:g}, "
                                             f"got {text!r}")
        return value
    return parse


positive_int, non_negative_int, positive_float = bounded(int, 1), bounded(int, 0), bounded(float, 0, exclusive=True)


def shares(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or not all(0 <= v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected fractions from 0 to 1 separated by commas, got {text!r}")
    return values


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
    from gpu_check import add_arguments  # here: gpu_check imports this module

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
        from gpu_check import gpu_check

        return gpu_check(args)
    if args.json:
        print(json.dumps(environment()), flush=True)
    try:
        {"make-data": make_data, "compute": compute, "loader": loader, "train": train}[args.command](args)
    except DatasetLayoutError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except MeasurementFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print("\n" + "\n".join(" | ".join(f"{k}={v}" for k, v in row.items()) for row in RESULTS), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
