"""CPU time per image of benchmark.py's two loader pipelines, for machines whose cores other jobs share.

    python measurements/loader_cpu_time.py --data-dir /tmp/bench --workers 2 --batch-size 64 --epochs 4

benchmark.py loader reports images per second of wall time, which on a shared machine measures the other
jobs as much as the loader. This runs the same two loaders (this repository's, and the torchvision reference:
ImageFolder + RandomResizedCrop + flip + ToTensor + Normalize) over whole epochs of the train folder, each
epoch's workers started and joined inside it, and divides the CPU time of the process and its workers by the
images delivered. Pipelines alternate, epoch by epoch; each one's best epoch counts. With the cores to
itself, a loader that keeps them busy delivers cores / (CPU seconds per image) images per second.
"""

import argparse
import json
import resource
import sys
from pathlib import Path

import torch
import torchvision
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data import ImageFolderDataset, TrainBatchSampler, make_loader  # noqa: E402
from dataset_paths import DatasetLayoutError, check_layout  # noqa: E402
from measure import non_negative_int, positive_int  # noqa: E402


def cpu_seconds() -> float:
    """User and system time of this process and of its children that have exited and been waited for."""
    return sum(r.ru_utime + r.ru_stime for r in map(resource.getrusage,
                                                   (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--workers", type=non_negative_int, default=2)
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--image-size", type=positive_int, default=224)
    parser.add_argument("--epochs", type=positive_int, default=4)
    args = parser.parse_args()
    root = args.data_dir / "train"
    ours = ImageFolderDataset(root, check_layout(args.data_dir).classes, True, args.image_size, seed=0)
    sampler = TrainBatchSampler(len(ours), args.batch_size, 0, 1, seed=0)
    reference_set = torchvision.datasets.ImageFolder(root, transforms.Compose([
        transforms.RandomResizedCrop(args.image_size), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]))
    loaders = {
        "project": lambda: make_loader(ours, sampler, args.workers, pin_memory=False),
        "torchvision": lambda: torch.utils.data.DataLoader(reference_set, args.batch_size, shuffle=True,
                                                           num_workers=args.workers, drop_last=True),
    }
    best = {}
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        for name, make in loaders.items():
            start, images = cpu_seconds(), 0
            for inputs, *_ in make():
                images += len(inputs)
            # The loop's end joined the workers, so their time is in RUSAGE_CHILDREN now.
            best[name] = min(best.get(name, float("inf")), (cpu_seconds() - start) / images)
    for name, seconds in best.items():
        print(json.dumps({"what": "loader-cpu", "pipeline": name, "workers": args.workers,
                          "batch_size": args.batch_size, "image_size": args.image_size, "epochs": args.epochs,
                          "cpu_ms_per_image": round(1000 * seconds, 3),
                          "ratio": round(best["torchvision"] / seconds, 2)}), flush=True)


if __name__ == "__main__":
    try:
        main()
    except DatasetLayoutError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
