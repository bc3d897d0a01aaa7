"""Accuracy for the time spent: train.py's --recipe presets side by side at several epoch budgets and seeds,
on small real datasets that run on a CPU.

    python compare_recipes.py --dataset digits --epochs 3 6 12 --seeds 0 1 2
    python compare_recipes.py --dataset photo-patches --epochs 3 6 12 --json

digits: scikit-learn's handwritten digits (train.py --demo's data). photo-patches: 12 classes, one per
photograph bundled with scikit-image, of random patches; val patches come from a band of each photo that
no training patch touches, so the task is recognising a scene's texture and colour, not memorising pixels.
Every run is `python train.py --demo --recipe R --epochs E --seed S`: the demo network at 32 px.
"""

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from data import make_demo_dataset
from dataset_paths import DEMO_DATA_DIR, REPO_DIR
from recipes import RECIPES

PHOTO_PATCHES_DIR = REPO_DIR / "data" / "photo_patches"
# scikit-image's bundled photographs (no download), each a class; grayscale ones are repeated in RGB.
PHOTOS = ("astronaut", "brick", "camera", "chelsea", "coffee", "coins", "grass", "gravel", "hubble_deep_field",
          "immunohistochemistry", "retina", "rocket")
TRAIN_PER_CLASS, VAL_PER_CLASS = 150, 40
VAL_BAND = 0.3  # the bottom 30% of each photo holds val patches only


def make_photo_patches(root: Path) -> Path:
    if (root / "train").is_dir() and (root / "val").is_dir():
        return root
    from skimage import data as skimage_data

    tmp = root.with_name(f"{root.name}.tmp")
    rng = np.random.default_rng(0)
    for name in PHOTOS:
        photo = getattr(skimage_data, name)()
        photo = np.repeat(photo[..., None], 3, axis=2) if photo.ndim == 2 else photo[..., :3]
        height, width = photo.shape[:2]
        split_row = int(height * (1 - VAL_BAND))
        for split, count, (top, bottom) in (("train", TRAIN_PER_CLASS, (0, split_row)),
                                            ("val", VAL_PER_CLASS, (split_row, height))):
            folder = tmp / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                side = int(rng.integers(40, min(120, bottom - top)))
                y, x = int(rng.integers(top, bottom - side + 1)), int(rng.integers(0, width - side + 1))
                patch = Image.fromarray(np.ascontiguousarray(photo[y:y + side, x:x + side]).astype(np.uint8))
                patch.resize((48, 48), Image.Resampling.BILINEAR).save(folder / f"{i:04d}.jpg", quality=90)
    tmp.rename(root)
    return root


def run_once(data_dir: Path, recipe: str, epochs: int, seed: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, str(REPO_DIR / "train.py"), "--demo", "--data-dir", str(data_dir), "--output-dir",
                   out, "--recipe", recipe, "--epochs", str(epochs), "--seed", str(seed), *extra]
        started = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
        with open(Path(out) / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
    return {"what": "recipe-run", "recipe": recipe, "epochs": epochs, "seed": seed,
            "val_acc1": float(rows[-1]["val_acc1"]), "train_seconds": sum(float(r["epoch_seconds"]) for r in rows),
            "wall_seconds": round(wall, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=["digits", "photo-patches"], default="digits")
    parser.add_argument("--epochs", type=int, nargs="+", default=[3, 6, 12], help="epoch budgets to try")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--json", action="store_true", help="also print every run as one JSON line")
    args, extra = parser.parse_known_args(argv)  # anything else goes to train.py, e.g. --workers 1
    data_dir = make_demo_dataset(DEMO_DATA_DIR) if args.dataset == "digits" else make_photo_patches(PHOTO_PATCHES_DIR)
    runs = []
    for epochs in args.epochs:
        for recipe in args.recipes:
            for seed in args.seeds:
                runs.append(run_once(data_dir, recipe, epochs, seed, extra))
                if args.json:
                    print(json.dumps({"dataset": args.dataset, **runs[-1]}), flush=True)
    print(f"\n{args.dataset}: val top-1 (%), mean and spread over seeds {args.seeds}; train.py --demo settings")
    print(f"{'epochs':>6} " + " ".join(f"{r:>22}" for r in args.recipes))
    for epochs in args.epochs:
        cells = []
        for recipe in args.recipes:
            these = [r for r in runs if r["recipe"] == recipe and r["epochs"] == epochs]
            accs, seconds = [r["val_acc1"] for r in these], statistics.mean(r["train_seconds"] for r in these)
            cells.append(f"{statistics.mean(accs):6.2f} ({min(accs):.1f}-{max(accs):.1f}) {seconds:4.0f} s")
        print(f"{epochs:>6} " + " ".join(f"{c:>22}" for c in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
