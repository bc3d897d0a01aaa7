"""Where data and outputs live, and the check that the data folder has the layout training needs.

The defaults fit an EC2 box with the data volume mounted at /mnt/imagenet and ImageNet extracted by
prepare_imagenet.py into /mnt/imagenet/extracted/{train,val}/<wnid>/. DATASET_PATH overrides the data
root; train.py's --data-dir overrides both. Runs go to /mnt/imagenet/runs/resnet50 there: see
default_output_dir.

Standard library only: setup_and_train.sh asks this module for the default output dir with the system
python3, so that it and a bare `python train.py` always agree.
"""

import os
from dataclasses import dataclass
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent
DEFAULT_DATA_DIR = Path(os.environ.get("DATASET_PATH", "/mnt/imagenet/extracted"))
# Data copied to /dev/shm for speed is fine; checkpoints there are gone at the next reboot.
MEMORY_FILESYSTEMS = {"tmpfs", "ramfs"}


def data_volume(data_root: str | os.PathLike) -> Path | None:
    """The mount point of the volume data_root lives on, or None when that is the root filesystem."""
    path = Path(os.path.realpath(data_root))
    for folder in (path, *path.parents):
        if os.path.ismount(folder):
            return None if folder == folder.parent else folder
    return None


def filesystem_type(mount_point: Path) -> str | None:
    try:
        with open("/proc/self/mounts") as f:
            # The last entry for a mount point is the one on top.
            types = {fields[1]: fields[2] for fields in (line.split() for line in f) if len(fields) > 2}
    except OSError:  # not Linux
        return None
    return types.get(str(mount_point))


def default_output_dir(data_root: str | os.PathLike, code_dir: Path = REPO_DIR) -> Path:
    """Where a run lives unless --output-dir says otherwise.

    <mount point>/runs/resnet50 (/mnt/imagenet/runs/resnet50 for the default data root) when the data sits
    on a mounted volume other than the root filesystem, not in memory, that this user can write to: a spot
    instance's root volume is deleted with the instance, the data volume survives, and the checkpoints with
    it. Else
    runs/resnet50 beside the code, so that rerunning `python train.py` from any working directory finds the
    same checkpoint. A run already started beside the code (and not on the volume) stays where it is, so
    that updating the code never leaves a run behind.
    """
    beside_code = code_dir / "runs" / "resnet50"
    volume = data_volume(data_root)
    if volume is None or filesystem_type(volume) in MEMORY_FILESYSTEMS or not os.access(volume, os.W_OK):
        return beside_code
    on_volume = volume / "runs" / "resnet50"
    if has_checkpoint(beside_code) and not has_checkpoint(on_volume):
        return beside_code
    return on_volume


def has_checkpoint(output_dir: Path) -> bool:
    # checkpoint.pth or checkpoint_prev.pth, spelled out here: checkpoint.py needs torch, this module must not.
    return any(output_dir.glob("checkpoint*.pth"))


DEFAULT_OUTPUT_DIR = default_output_dir(DEFAULT_DATA_DIR)
DEMO_DATA_DIR = REPO_DIR / "data" / "digits"
DEMO_OUTPUT_DIR = REPO_DIR / "runs" / "demo"

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class UsageError(Exception):
    """Something the user can fix; printed as one paragraph and exit code 2."""


class DatasetLayoutError(Exception):
    """The data folder cannot be trained on; the message says what to do about it."""


@dataclass
class DatasetLayout:
    root: Path
    classes: list[str]
    train_images: int
    val_images: int

    def summary(self) -> str:
        return (f"{self.root}: {len(self.classes)} classes, {self.train_images:,} train images, "
                f"{self.val_images:,} val images")


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def class_folders(split_dir: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir() and not entry.name.startswith("."))


def count_images(split_dir: Path, classes: list[str]) -> int:
    return sum(sum(1 for e in os.scandir(split_dir / c) if e.is_file() and is_image(e.name)) for c in classes)


def check_layout(root: str | os.PathLike) -> DatasetLayout:
    """Check root/train and root/val before any model or GPU work; raise DatasetLayoutError if unusable."""
    root = Path(root)
    prepare_hint = ("prepare_imagenet.py turns the ILSVRC2012 archives into this layout; see "
                    "ImageNet_Setup_Guide.md.")
    if root.exists() and not root.is_dir():
        raise DatasetLayoutError(
            f"The data folder {root} is a file, not a folder. Pass --data-dir (or set DATASET_PATH to) the folder "
            f"that holds train/<class>/*.JPEG and val/<class>/*.JPEG; an archive must be unpacked first. "
            f"{prepare_hint}")
    if not root.is_dir():
        raise DatasetLayoutError(
            f"The data folder {root} does not exist. Pass --data-dir or set DATASET_PATH to a folder holding "
            f"train/<class>/*.JPEG and val/<class>/*.JPEG, or run with --demo to train on the bundled "
            f"digits dataset. {prepare_hint}")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DatasetLayoutError(
                f"{root} has no {split}/ folder. Expected {root}/train/<class>/*.JPEG and "
                f"{root}/val/<class>/*.JPEG. {prepare_hint}")
    train_classes = class_folders(root / "train")
    if not train_classes:
        raise DatasetLayoutError(f"{root}/train has no class folders. {prepare_hint}")
    val_classes = class_folders(root / "val")
    loose_val = sum(1 for e in os.scandir(root / "val") if e.is_file() and is_image(e.name))
    if not val_classes and loose_val:
        raise DatasetLayoutError(
            f"{root}/val holds {loose_val:,} images directly instead of class folders. This is how "
            f"ILSVRC2012_img_val.tar unpacks: the labels live in the devkit (or Kaggle's "
            f"LOC_val_solution.csv). Run `python prepare_imagenet.py --val-tar ILSVRC2012_img_val.tar "
            f"--devkit ILSVRC2012_devkit_t12.tar.gz --out {root}` to sort them into val/<wnid>/.")
    if val_classes != train_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        raise DatasetLayoutError(
            f"{root}/train and {root}/val must hold the same class folders: {len(train_classes)} in train, "
            f"{len(val_classes)} in val; only in train: {only_train[:5]}{' ...' if len(only_train) > 5 else ''}"
            f"; only in val: {only_val[:5]}{' ...' if len(only_val) > 5 else ''}. {prepare_hint}")
    layout = DatasetLayout(root, train_classes, count_images(root / "train", train_classes),
                           count_images(root / "val", val_classes))
    if layout.train_images == 0 or layout.val_images == 0:
        empty = "train" if layout.train_images == 0 else "val"
        raise DatasetLayoutError(f"{root}/{empty} has class folders but no images in them. {prepare_hint}")
    return layout
