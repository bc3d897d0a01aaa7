"""Side-by-side speed measurements, printed as a table (and one JSON object per line with --json).

    python benchmark.py make-data --out /tmp/bench --images 10000   # ImageNet-like JPEGs from real photos
    python benchmark.py compute --json                              # train step, synthetic data on the device
    python benchmark.py loader --data-dir /tmp/bench --workers 8 --seconds 20 --json
    python benchmark.py train --data-dir /tmp/bench --steps 200 --json
    python benchmark.py train --data-dir /tmp/bench --decode gpu --gpu-decode-share 0,0.25,0.5,1

compute: this project's ResNet-50 against torchvision's, same precision, memory format and batch.
loader: this project's input pipeline against the torchvision reference (ImageFolder + PIL +
RandomResizedCrop + flip + ToTensor + Normalize), same workers and batch size, on the same files.
train: train.py's own loop (Trainer.train_epoch) on a JPEG folder; img/s and its ratio to compute-only, over
whole epochs and without each epoch's worker start-up; with --decode gpu, for each --gpu-decode-share given.
"""

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

from data import ImageFolderDataset, TrainBatchSampler, make_loader, usable_cores
from dataset_paths import check_layout
from gpu_decode import DeviceBatchDecoder, EncodedImageFolderDataset, collate_encoded
from model import resnet50

RESULTS: list[dict] = []


def report(args, **row) -> dict:
    RESULTS.append(row)
    if args.json:
        print(json.dumps(row), flush=True)
    return row


def environment() -> dict:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"what": "environment", "torch": torch.__version__, "torchvision": torchvision.__version__,
            "gpu": gpu, "cpus": os.cpu_count(), "machine": platform.platform()}


# ------------------------------------------------------------------------------------------------- make-data

def write_image(job: tuple[Path, int]) -> int:
    """One JPEG of ImageNet's typical size (500x375, one in ten larger), cut from a real photograph at a
    random position and scale, with sensor-like noise so it compresses like a camera photo (~100 KB)."""
    from sklearn.datasets import load_sample_image

    path, seed = job
    rng = np.random.default_rng(seed)
    photo = load_sample_image(["china.jpg", "flower.jpg"][seed % 2])  # 427x640 RGB
    width, height = (500, 375) if rng.random() < 0.9 else (1000, 750)
    if rng.random() < 0.5:
        width, height = height, width
    crop_h, crop_w = int(rng.integers(200, 427)), int(rng.integers(250, 640))
    top, left = int(rng.integers(0, 428 - crop_h)), int(rng.integers(0, 641 - crop_w))
    img = Image.fromarray(photo[top:top + crop_h, left:left + crop_w]).resize((width, height), Image.BICUBIC)
    pixels = np.asarray(img, dtype=np.float32) + rng.normal(0, 6, (height, width, 3))
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)
    return path.stat().st_size


def make_data(args) -> None:
    jobs = []
    for split, count in (("train", args.images), ("val", max(args.classes, args.images // 10))):
        for i in range(count):
            folder = Path(args.out) / split / f"n{i % args.classes:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            jobs.append((folder / f"{split}_{i:07d}.JPEG", 2 * i + (split == "val")))
    with ProcessPoolExecutor() as pool:
        sizes = list(pool.map(write_image, jobs, chunksize=64))
    report(args, what="make-data", out=str(args.out), images=len(sizes), mean_kb=round(np.mean(sizes) / 1024, 1))


# ------------------------------------------------------------------------------------------------- compute

def time_train_steps(model, args, device, steps: int) -> float:
    """img/s of forward + backward + SGD step on one fixed synthetic batch, timed with CUDA events."""
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.precision]
    model = model.to(device, memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    step_model = torch.compile(model) if args.compile else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, model.fc.out_features, (args.batch_size,), device=device)

    def step():
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = torch.nn.functional.cross_entropy(step_model(x), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    for _ in range(args.warmup):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return steps * args.batch_size / (time.perf_counter() - start)


def compute(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    settings = dict(precision=args.precision, channels_last=args.channels_last, compile=args.compile,
                    batch_size=args.batch_size, image_size=args.image_size, device=device.type)
    best = {}
    # Two interleaved rounds, best of each: whichever model ran first would otherwise pay for warming up
    # the allocator and the cuDNN autotuner.
    for _ in range(2):
        for name, build in (("project", resnet50), ("torchvision", torchvision.models.resnet50)):
            best[name] = max(best.get(name, 0.0), time_train_steps(build(), args, device, args.steps))
    for name, img_s in best.items():
        report(args, what="compute", model=name, img_s=round(img_s, 1),
               ms_step=round(1000 * args.batch_size / img_s, 2), **settings)


# ------------------------------------------------------------------------------------------------- loader

def time_loader(loader, seconds: float, warmup_batches: int = 3, finish=None) -> float:
    """img/s of `loader`; finish(images), if given, is the work the training process still does per batch."""
    def endless():  # small folders end an epoch within the measurement; start the next one at once
        while True:
            for inputs, *_ in loader:
                yield finish(inputs) if finish else inputs

    batches = endless()
    for _ in range(warmup_batches):  # worker start-up is not throughput
        next(batches)
    images, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        images += len(next(batches))
    return images / (time.perf_counter() - start)


def loader(args) -> None:
    from torchvision import transforms

    root = Path(args.data_dir) / "train"
    classes = check_layout(args.data_dir).classes
    dataset = EncodedImageFolderDataset if args.decode == "gpu" else ImageFolderDataset
    ours = dataset(root, classes, True, args.image_size, seed=0)
    sampler = TrainBatchSampler(len(ours), args.batch_size, 0, 1, seed=0)
    if args.decode == "gpu":  # workers read files; decode, crop and normalization happen on the device
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        project = make_loader(ours, sampler, args.workers, pin_memory=False, collate_fn=collate_encoded)
        decode = DeviceBatchDecoder(device)

        def finish(batch):
            images = decode(batch)
            if device.type == "cuda":
                torch.cuda.synchronize()  # the batch counts once the device has made it
            return images

        project_row = {"pipeline": "project-gpu-decode", "decode_device": device.type}
    else:
        project = make_loader(ours, sampler, args.workers, pin_memory=torch.cuda.is_available())
        finish, project_row = None, {"pipeline": "project"}
    reference_set = torchvision.datasets.ImageFolder(root, transforms.Compose([
        transforms.RandomResizedCrop(args.image_size), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]))
    reference = torch.utils.data.DataLoader(reference_set, args.batch_size, shuffle=True, num_workers=args.workers,
                                            pin_memory=torch.cuda.is_available(), drop_last=True)
    for row, dl, done in ((project_row, project, finish), ({"pipeline": "torchvision"}, reference, None)):
        img_s = time_loader(dl, args.seconds, finish=done)
        report(args, what="loader", **row, workers=args.workers, img_s=round(img_s, 1),
               img_s_per_worker=round(img_s / max(args.workers, 1), 1), image_size=args.image_size)


# ------------------------------------------------------------------------------------------------- train

class FirstBatchClock:
    """A loader that notes when each epoch's first batch arrives. Everything before it is the workers'
    start-up, which an ImageNet epoch (5,004 steps) pays once and a benchmark epoch of a few steps pays
    often enough to hide the steady rate."""

    def __init__(self, loader):
        self.loader, self.num_workers, self.arrived = loader, loader.num_workers, 0.0

    def __iter__(self):
        batches = iter(self.loader)
        first = next(batches)
        self.arrived = time.perf_counter()
        yield first
        yield from batches


def time_train_loop(train_script, args, share: float) -> dict:
    """train.py's Trainer.train_epoch on --data-dir: one warm-up epoch, then whole epochs covering --steps."""
    cfg = train_script.parse_config([
        "--data-dir", str(args.data_dir), "--batch-size", str(args.batch_size), "--image-size",
        str(args.image_size), "--workers", str(args.workers), "--precision", args.precision,
        *(["--compile"] if args.compile else []), "--decode", args.decode, "--gpu-decode-share", str(share),
        "--output-dir", "/nonexistent"])  # nothing is saved: checkpoints are due only after 10 minutes
    trainer = train_script.Trainer(cfg, check_layout(cfg.data_dir).classes)
    trainer.train_loader = clock = FirstBatchClock(trainer.train_loader)
    per_epoch = trainer.sampler.steps_per_epoch()
    epochs = 1 + -(-args.steps // per_epoch)
    whole, steady, waits = 0.0, 0.0, []
    for epoch in range(epochs):
        trainer.epoch, trainer.samples_done = epoch, 0
        start = time.perf_counter()
        trainer.train_epoch()
        if trainer.normalize.device.type == "cuda":
            torch.cuda.synchronize()
        if epoch:
            end = time.perf_counter()
            whole, steady = whole + end - start, steady + end - clock.arrived
            waits.append(trainer.data_wait_fraction)
    batch = trainer.sampler.global_batch
    steps = per_epoch * (epochs - 1)
    decode = "gpu" if train_script.decode_on_device(args.decode, trainer.normalize.device) else "cpu"
    return {"what": "train", "img_s": round(steps * batch / whole, 1),
            "steady_img_s": round((steps - epochs + 1) * batch / steady, 1),
            "data_wait_pct": round(100 * float(np.mean(waits)), 1), "steps": steps, "batch_size": args.batch_size,
            "image_size": args.image_size, "workers": args.workers, "precision": trainer.precision,
            "compile": args.compile, "decode": decode, **({"gpu_decode_share": share} if decode == "gpu" else {})}

def train(args) -> None:
    import train as train_script

    train_script.RT = train_script.setup_distributed(train_script.resolve_device("auto"))
    shares = args.gpu_decode_share if args.decode == "gpu" else [1.0]
    rows = []
    for share in shares:
        with contextlib.redirect_stdout(sys.stderr):  # train.py's progress bar and log; stdout is for results
            rows.append(time_train_loop(train_script, args, share))
    args.precision, args.channels_last = rows[0]["precision"], train_script.RT.device.type == "cuda"
    compute_only = time_train_steps(resnet50(len(check_layout(args.data_dir).classes)), args, train_script.RT.device,
                                    args.compute_steps)
    for row in rows:
        report(args, **row, compute_only_img_s=round(compute_only, 1), ratio=round(row["img_s"] / compute_only, 3),
               steady_ratio=round(row["steady_img_s"] / compute_only, 3))


def shares(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or not all(0 <= v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected fractions from 0 to 1 separated by commas, got {text!r}")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("make-data", "compute", "loader", "train"):
        p = sub.add_parser(name)
        p.add_argument("--json", action="store_true", help="one JSON object per measurement on stdout")
        p.add_argument("--batch-size", type=int, default=256)
        p.add_argument("--image-size", type=int, default=224)
    sub.choices["make-data"].add_argument("--out", type=Path, required=True)
    sub.choices["make-data"].add_argument("--images", type=int, default=10_000, help="train images")
    sub.choices["make-data"].add_argument("--classes", type=int, default=10)
    for name in ("compute", "train"):
        sub.choices[name].add_argument("--precision", default="bf16" if name == "compute" else "auto",
                                       choices=["bf16", "fp16", "fp32", "auto"])
        sub.choices[name].add_argument("--compile", action="store_true")
        sub.choices[name].add_argument("--warmup", type=int, default=10)
    sub.choices["compute"].add_argument("--steps", type=int, default=30)
    sub.choices["compute"].add_argument("--no-channels-last", dest="channels_last", action="store_false")
    for name in ("loader", "train"):
        sub.choices[name].add_argument("--data-dir", type=Path, required=True)
        sub.choices[name].add_argument("--workers", type=int, default=max(1, usable_cores() - 1))
    sub.choices["loader"].add_argument("--seconds", type=float, default=20)
    for name in ("loader", "train"):
        sub.choices[name].add_argument("--decode", choices=["cpu", "gpu"], default="cpu",
                                       help="gpu: workers read files, batches are decoded on cuda (loader: on the "
                                            "cpu without one; train: train.py --decode)")
    sub.choices["train"].add_argument("--steps", type=int, default=100)
    sub.choices["train"].add_argument("--compute-steps", type=int, default=30,
                                      help="timed steps of the compute-only figure it is compared with")
    sub.choices["train"].add_argument("--gpu-decode-share", type=shares, default=[1.0],
                                      help="with --decode gpu: train.py's --gpu-decode-share, or several separated "
                                           "by commas to measure each (e.g. 0,0.25,0.5,1)")
    args = parser.parse_args()
    if args.json:
        print(json.dumps(environment()), flush=True)
    {"make-data": make_data, "compute": compute, "loader": loader, "train": train}[args.command](args)
    print("\n" + "\n".join(" | ".join(f"{k}={v}" for k, v in row.items()) for row in RESULTS), file=sys.stderr)


if __name__ == "__main__":
    main()
