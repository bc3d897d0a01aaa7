"""Per-image cost and pixel difference of the CPU loader's decode paths, on the same crops and flips.

    python measurements/compare_cpu_decode.py --data-dir /tmp/bench --images 400 --json

For the first --images train files (or val with --val), the crop box and flip the loader draws for epoch 0
are applied by
- reference: torchvision on PIL's full decode: resized_crop of the box (RandomResizedCrop's pixels), or for
  val resize + center_crop; timed with ToTensor and Normalize after it, as benchmark.py's reference loader;
- pil: decode_region_pil, the PIL-only path (reduced-size decode through PIL's draft);
- fast: ImageFolderDataset.load, libjpeg-turbo decode and torch's antialiased resize where the file allows.
Prints ms per image on one thread, as CPU time of that thread (best of --rounds interleaved rounds), so that
other processes sharing the cores count as little as possible, and the mean absolute difference of pil and
fast to the reference, in grey levels.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    VAL_CROP_FRACTION,
    ImageFolderDataset,
    center_crop_box,
    decode_region_pil,
    random_resized_crop_box,
    sample_rng,
)
from dataset_paths import DatasetLayoutError, check_layout  # noqa: E402
from measure import positive_int  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--images", type=positive_int, default=400)
    parser.add_argument("--image-size", type=positive_int, default=224)
    parser.add_argument("--rounds", type=positive_int, default=3)
    parser.add_argument("--val", action="store_true", help="the val center crop instead of training crops")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    split = "val" if args.val else "train"
    dataset = ImageFolderDataset(args.data_dir / split, check_layout(args.data_dir).classes, not args.val,
                                 args.image_size, seed=0)
    indices = range(min(args.images, len(dataset)))
    size = args.image_size

    def draw(index, width, height):
        """The box and flip the loader draws for (seed 0, epoch 0, index), in the same order."""
        if args.val:
            return center_crop_box(width, height, size), False
        rng = sample_rng(0, 0, index)
        box = random_resized_crop_box(rng, width, height, dataset.min_crop_scale)
        return box, rng.random() < 0.5

    def reference(index):
        with Image.open(dataset.paths[index].decode()) as img:
            rgb = img.convert("RGB")
        (left, top, w, h), flip = draw(index, *rgb.size)
        if args.val:
            out = F.center_crop(F.resize(rgb, round(size / VAL_CROP_FRACTION)), size)
        else:
            out = F.resized_crop(rgb, top, left, h, w, [size, size])
        return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else out

    def torchvision_like(index):
        return F.normalize(F.to_tensor(reference(index)), IMAGENET_MEAN, IMAGENET_STD)

    def pil(index):
        flips = []

        def box_fn(width, height):
            box, flip = draw(index, width, height)
            flips.append(flip)
            return box

        out = decode_region_pil(dataset.paths[index], box_fn, size)
        return torch.from_numpy(np.array(out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flips[0] else out))

    def fast(index):
        return dataset.load(0, index)

    expected = [np.asarray(reference(i), dtype=np.float32) for i in indices]
    diffs = {name: [float(np.abs(fn(i).numpy() - e).mean()) for i, e in zip(indices, expected, strict=True)]
             for name, fn in (("pil", pil), ("fast", fast))}
    best = {}
    for _ in range(args.rounds):
        for name, fn in (("torchvision", torchvision_like), ("pil", pil), ("fast", fast)):
            start = time.thread_time()
            for i in indices:
                fn(i)
            best[name] = min(best.get(name, float("inf")), (time.thread_time() - start) / len(indices))
    for name in best:
        row = {"what": "cpu-decode", "split": split, "path": name, "images": len(indices), "image_size": size,
               "ms_per_image": round(1000 * best[name], 3), "ratio": round(best["torchvision"] / best[name], 2)}
        if name in diffs:
            row |= {"mean_diff": round(float(np.mean(diffs[name])), 3), "max_image_diff": round(max(diffs[name]), 2)}
        print(json.dumps(row) if args.json else " | ".join(f"{k}={v}" for k, v in row.items()), flush=True)


if __name__ == "__main__":
    try:
        main()
    except DatasetLayoutError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
