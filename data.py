"""Datasets, deterministic distributed sampling, augmentation and loaders.

Exact resume rests on two rules:
- The order of epoch e is a permutation drawn from (seed, e). Every global batch is a contiguous slice of
  it and rank r takes its share of each slice, so "how many samples of this epoch are done" is the whole
  position, whatever the number of processes.
- Everything random about sample i of epoch e (crop box, flip) comes from a generator seeded by
  (seed, e, i), never from worker or global RNG state. The number of workers, a kill or a restart cannot
  change what a sample looks like, so nothing about the loader has to be checkpointed.

Workers decode to uint8 HWC arrays; the float conversion and normalization happen on the training device
(see `Normalizer`), which keeps host-to-device copies 4x smaller and CPU workers doing only what needs a CPU.
"""

import math
import os
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dataset_paths import UsageError, is_image

try:
    import simplejpeg
except ImportError:  # scripts that decode no JPEG here (benchmark.py's compute rows) must still start
    simplejpeg = None

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Val images are resized so the center crop keeps 87.5% of the shorter side (224 of 256), as usual.
VAL_CROP_FRACTION = 0.875
# Errors that mean "this file is not a usable image"; anything else is a bug and must surface.
BAD_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
# A bad image is replaced by the next file in the list; give up after this many bad ones in a row.
MAX_CONSECUTIVE_BAD = 16
# JPEG colour spaces that libjpeg-turbo turns into the same RGB pixels as PIL (full decodes compared: bit-identical).
# CMYK and YCCK files go to PIL, which inverts Adobe's CMYK where libjpeg-turbo does not.
TURBO_COLORSPACES = ("YCbCr", "Gray", "RGB")
# Batches each loader worker keeps ready ahead of the step (torch's default). They wait in shared memory
# (/dev/shm): at 224 px and batch 256 a batch is 38.5 MB, and 8 GPUs with 15 workers each hold 9 GB at 2.
PREFETCH_BATCHES = 2
SHARED_MEMORY = "/dev/shm"

class DataVanishedError(Exception):
    """A class folder listed at the start is gone: the data was moved, deleted or its volume unmounted.
    Skipping would count every image as unreadable, so this stops the run instead."""


class FailingVolumeError(Exception):
    """MAX_CONSECUTIVE_BAD training files in a row were unreadable: more likely a failing disk than bad files."""


def usable_cores() -> int:
    """The CPU cores this process may run on: taskset and container CPU sets count, unlike os.cpu_count()."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def list_samples(split_dir: Path, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Paths and labels of every image under split_dir/<class>/, in a fixed (sorted) order.

    Returned as numpy arrays rather than a list of Python objects: forked workers then share the pages
    instead of copying them as reference counts change (1.28M tuples would cost each worker ~200 MB).
    """
    paths, labels = [], []
    for label, name in enumerate(classes):
        names = sorted(e.name for e in os.scandir(split_dir / name) if e.is_file() and is_image(e.name))
        paths.extend(os.fsencode(split_dir / name / n) for n in names)
        labels.extend([label] * len(names))
    return np.array(paths, dtype=np.bytes_), np.array(labels, dtype=np.int64)


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, index])


def random_resized_crop_box(rng: np.random.Generator, width: int, height: int, min_scale: float,
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(left, top, crop_width, crop_height) with the distribution of torchvision's RandomResizedCrop."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(min_scale, 1.0)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    # Rare fallback (extreme aspect ratios): the largest centred crop with an allowed aspect ratio.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def center_crop_box(width: int, height: int, image_size: int) -> tuple[float, float, float, float]:
    """The region, in source pixels, that torchvision's val transform keeps: Resize(image_size / 0.875) of the
    shorter side, then CenterCrop(image_size), with their rounding. Its edges fall on whole pixels of that
    resized image, so resize_region reproduces the transform exactly, and PIL's resize(box=...) does too."""
    short = round(image_size / VAL_CROP_FRACTION)
    resized_w, resized_h = ((short, int(short * height / width)) if width <= height
                            else (int(short * width / height), short))
    left, top = round((resized_w - image_size) / 2), round((resized_h - image_size) / 2)
    scale_x, scale_y = width / resized_w, height / resized_h
    return left * scale_x, top * scale_y, image_size * scale_x, image_size * scale_y


def decode_region_pil(path: bytes, box_fn, image_size: int) -> Image.Image:
    """decode_region with PIL alone: the path for every file libjpeg-turbo does not take (see decode_crop).

    JPEG can decode at 1/2, 1/4 or 1/8 scale almost for free (PIL's draft); we ask for the smallest scale
    at which the crop still has at least image_size pixels on each side, so quality matches a full
    decode followed by a downscale while the decoder does up to 64x less work.
    """
    with Image.open(os.fsdecode(path)) as img:
        width, height = img.size
        left, top, crop_w, crop_h = box_fn(width, height)
        shrink = image_size / min(crop_w, crop_h)
        if shrink < 1:
            img.draft("RGB", (math.ceil(width * shrink), math.ceil(height * shrink)))
        sx, sy = img.size[0] / width, img.size[1] / height
        if img.mode != "RGB":  # convert() would copy even an RGB image: 15% of the time per image, measured
            img = img.convert("RGB")
        box = (left * sx, top * sy, (left + crop_w) * sx, (top + crop_h) * sy)
        return img.resize((image_size, image_size), Image.Resampling.BILINEAR, box=box)


def resize_region(image: np.ndarray, box: tuple[float, float, float, float], image_size: int) -> np.ndarray:
    """The (left, top, width, height) box of an HWC uint8 image resized to image_size x image_size with
    torchvision's pixels: a whole-pixel box (every training box) is cut out, then resized, as RandomResizedCrop
    does; a box with fractional edges (center_crop_box's) has them on whole pixels of the image scaled to its
    size, so the image is scaled, then cut, as Resize + CenterCrop do.

    torch's antialiased bilinear interpolation of uint8 channels-last images is PIL's BILINEAR filter in fixed
    point: 0.01 grey level from torchvision's crops on average, 2 at most, in 0.17 ms per 224 px training crop
    against PIL's 0.91 and OpenCV INTER_AREA's 0.60 (one core, make-data JPEGs).
    """
    left, top, width, height = box
    if all(float(v).is_integer() for v in box):
        image, size = image[int(top):int(top + height), int(left):int(left + width)], (image_size, image_size)
        left = top = 0
    else:
        scale_x, scale_y = image_size / width, image_size / height
        size = (round(image.shape[0] * scale_y), round(image.shape[1] * scale_x))
        if size[0] * size[1] > 16 * image_size ** 2:
            # A panorama of extreme shape (a 2 x 3000 px file scales to 256 x 384,000, 300 MB): PIL's resize
            # of the box computes only the output pixels, the same ones within a grey level.
            return np.array(Image.fromarray(image).resize((image_size, image_size), Image.Resampling.BILINEAR,
                                                          box=(left, top, left + width, top + height)))
        left, top = round(left * scale_x), round(top * scale_y)
    channels_first = torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0)
    # The fast uint8 kernel wants channels-last memory; a cut-out is not contiguous, so this copies it (cheap).
    resized = F.interpolate(channels_first.contiguous(memory_format=torch.channels_last), size=size,
                            mode="bilinear", antialias=True)
    return resized[0, :, top:top + image_size, left:left + image_size].permute(1, 2, 0).numpy()


def simplejpeg_missing() -> str | None:
    """Why the loader cannot decode JPEGs here, in one line, or None."""
    if simplejpeg is None:
        return ("simplejpeg, the loader's JPEG decoder, is not installed; install the requirements with "
                "`pip install -r requirements.txt`.")
    return None


def decode_crop(path: bytes, box_fn, image_size: int) -> np.ndarray:
    """The region box_fn(width, height) of the image file at `path` resized to image_size x image_size, as a
    writable HWC uint8 RGB array.

    JPEGs that libjpeg-turbo can turn into RGB are decoded by it through simplejpeg (the same pixels as PIL's
    decode, 1.5x as fast) and resized by resize_region (torchvision's pixels within 2 grey levels). The whole image
    is decoded: libjpeg-turbo's half-size decode came out 3 grey levels from PIL on the crops it could serve
    (twice the output size or more), and those are under 10% of training crops of ImageNet-sized files.
    Every other file, one libjpeg-turbo finds damaged, and one larger than PIL accepts, goes to
    decode_region_pil, so odd and broken files decode, or fail with the same errors, exactly as with
    PIL alone. box_fn is called once, after the decode has settled which path serves the file, so a
    sample's random draws do not depend on the path.
    """
    if simplejpeg is None:  # not decode_region_pil instead: it resizes to other pixels, silently
        raise ModuleNotFoundError(simplejpeg_missing())
    with open(os.fsdecode(path), "rb") as file:  # the path as PIL spells it, so a missing file reads the same
        data = file.read()
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        turbo = colorspace in TURBO_COLORSPACES and (Image.MAX_IMAGE_PIXELS is None
                                                     or width * height <= Image.MAX_IMAGE_PIXELS)
        image = simplejpeg.decode_jpeg(data, colorspace="RGB") if turbo else None
    except ValueError:  # simplejpeg's only error: not a JPEG, or a damaged one
        image = None
    if image is None:
        return np.array(decode_region_pil(path, box_fn, image_size), dtype=np.uint8)
    return resize_region(image, box_fn(width, height), image_size)


def decode_region(path: bytes, box_fn, image_size: int) -> Image.Image:
    """decode_crop as a PIL image."""
    return Image.fromarray(decode_crop(path, box_fn, image_size))


def progressive_image_size(epoch: int, epochs: int, start: int, final: int) -> int:
    """Train crop of `epoch` (0-based) when it grows linearly from `start` in the first epoch to `final` in
    the last, in multiples of 16 px so that only a few shapes reach cuDNN's autotuner; start 0: always final.
    Small images early cost less and barely hurt accuracy (FFCV's ResNet-50 recipes ramp 160 to 192 px)."""
    if start <= 0 or epochs <= 1 or epoch >= epochs - 1:
        return final
    size = start + (final - start) * epoch / (epochs - 1)
    return max(16, int(round(size / 16)) * 16)


class ImageFolderDataset(torch.utils.data.Dataset):
    """A split of an ImageNet-style folder. Items are addressed by (epoch, index) so that augmentation is
    a pure function of (seed, epoch, index); see the module docstring."""

    def __init__(self, split_dir: Path, classes: list[str], train: bool, image_size: int, seed: int,
                 min_crop_scale: float = 0.08, start_image_size: int = 0, epochs: int = 1):
        self.paths, self.labels = list_samples(Path(split_dir), classes)
        self.train, self.image_size, self.seed, self.min_crop_scale = train, image_size, seed, min_crop_scale
        self.start_image_size, self.epochs = start_image_size, epochs  # progressive resizing, training only

    def image_size_at(self, epoch: int) -> int:
        if not self.train:
            return self.image_size
        return progressive_image_size(epoch, self.epochs, self.start_image_size, self.image_size)

    def __len__(self) -> int:
        return len(self.labels)

    def shared_bytes_per_image(self) -> int:
        """What one image occupies in a batch on its way from a loader worker: its largest crop, uint8 RGB."""
        return 3 * max(self.image_size, self.start_image_size) ** 2

    def load(self, epoch: int, index: int) -> torch.Tensor:
        if self.train:
            rng = sample_rng(self.seed, epoch, index)
            image = torch.from_numpy(decode_crop(
                self.paths[index], lambda w, h: random_resized_crop_box(rng, w, h, self.min_crop_scale),
                self.image_size_at(epoch)))
            return image.flip(1) if rng.random() < 0.5 else image
        return torch.from_numpy(decode_crop(self.paths[index], lambda w, h: center_crop_box(w, h, self.image_size),
                                            self.image_size))

    def __getitem__(self, item: tuple[int, int]):
        """Returns (HWC uint8 image, label, descriptions of the unreadable files met on the way).

        Training replaces an unreadable image by the next file, so batch shapes (BatchNorm, DDP) stay the
        same; validation returns a blank image labelled -1 instead, which evaluation leaves out, so no
        image is counted twice.
        """
        epoch, index = item
        skipped = []
        for attempt in range(MAX_CONSECUTIVE_BAD if self.train else 1):
            i = (index + attempt) % len(self.labels)
            try:
                return self.load(epoch, i), int(self.labels[i]), skipped
            except BAD_IMAGE_ERRORS as err:
                folder = os.path.dirname(os.fsdecode(self.paths[i]))
                if isinstance(err, FileNotFoundError) and not os.path.isdir(folder):
                    raise DataVanishedError(f"{folder} no longer exists") from err
                skipped.append(f"{os.fsdecode(self.paths[i])} ({type(err).__name__}: {err})")
        if not self.train:
            return torch.zeros(self.image_size, self.image_size, 3, dtype=torch.uint8), -1, skipped
        raise FailingVolumeError(f"{MAX_CONSECUTIVE_BAD} unreadable images in a row, starting at "
                           f"{os.fsdecode(self.paths[index])}; is the data volume failing?\n" + "\n".join(skipped))


def collate(items):
    images, labels, skipped = zip(*items, strict=True)
    return torch.stack(images), torch.tensor(labels), [s for per_item in skipped for s in per_item]


class TrainBatchSampler:
    """DistributedSampler semantics (new shuffle each epoch, each rank its own share, incomplete last
    global batch dropped), but resumable mid-epoch at any sample and yielding (epoch, index) pairs."""

    def __init__(self, num_samples: int, batch_size: int, rank: int, world_size: int, seed: int):
        self.num_samples, self.batch_size, self.rank, self.world_size = num_samples, batch_size, rank, world_size
        self.seed = seed
        self.global_batch = batch_size * world_size
        self.epoch, self.start = 0, 0

    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    def set_epoch(self, epoch: int, samples_done: int = 0) -> None:
        """Start epoch `epoch` after its first `samples_done` samples (counted over all ranks)."""
        self.epoch, self.start = epoch, samples_done

    def __len__(self) -> int:
        return (self.num_samples - self.start) // self.global_batch

    def __iter__(self):
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_samples)
        for step in range(len(self)):
            first = self.start + step * self.global_batch + self.rank * self.batch_size
            yield [(self.epoch, int(i)) for i in order[first:first + self.batch_size]]


class ValBatchSampler:
    """Rank r evaluates images r, r + world_size, ...: every image exactly once, no padding duplicates."""

    def __init__(self, num_samples: int, batch_size: int, rank: int, world_size: int):
        self.indices = range(rank, num_samples, world_size)
        self.batch_size = batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    def __iter__(self):
        for first in range(0, len(self.indices), self.batch_size):
            yield [(0, i) for i in self.indices[first:first + self.batch_size]]


def check_shared_memory(bytes_per_image: int, batch_size: int, workers: int, processes: int) -> None:
    """Refuse to start a loader that would outgrow the free shared memory: `processes` like it on this machine
    (one per GPU; a process runs one loader at a time, train then val), each of their `workers` keeping
    PREFETCH_BATCHES batches ready. A worker that finds /dev/shm full fails at its first batches (a bus error, or
    "unable to allocate shared memory", and the run waits for it), as in a Docker container's default 64 MB."""
    try:
        stats = os.statvfs(SHARED_MEMORY)
    except FileNotFoundError:
        return  # no /dev/shm (macOS): torch shares tensors through files elsewhere
    free = stats.f_bavail * stats.f_frsize
    batch_bytes = batch_size * bytes_per_image
    needed = processes * workers * PREFETCH_BATCHES * batch_bytes
    if needed <= free:
        return
    fitting = free // (processes * PREFETCH_BATCHES * batch_bytes)
    raise UsageError(
        f"The data loaders would keep {needed / 1e6:,.1f} MB of batches in shared memory ({SHARED_MEMORY}): "
        f"{processes} process{'es' if processes > 1 else ''} x {workers} worker{'s' if workers > 1 else ''} x "
        f"{PREFETCH_BATCHES} batches x {batch_bytes / 1e6:,.1f} MB ({batch_size} images of "
        f"{bytes_per_image / 1e3:,.1f} KB), but {SHARED_MEMORY} has {free / 1e6:,.1f} MB free: a worker that runs "
        f"out fails at its first batches (a bus error, or \"unable to allocate shared memory\"). In a Docker "
        f"container, start it with `docker run --ipc=host ...` (the host's shared memory) or "
        f"`--shm-size={math.ceil(needed / 2 ** 30) + 1}g`; or lower --batch-size or --workers"
        f"{f' ({fitting} fit)' if fitting else ''}.")


def make_loader(dataset, batch_sampler, workers: int, pin_memory: bool, worker_init_fn=None, collate_fn=collate,
                processes: int = 1) -> torch.utils.data.DataLoader:
    """`processes`: how many processes on this machine run a loader like this one at the same time."""
    if workers > 0:
        check_shared_memory(dataset.shared_bytes_per_image(), batch_sampler.batch_size, workers, processes)
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batch_sampler, num_workers=workers, collate_fn=collate_fn, pin_memory=pin_memory,
        worker_init_fn=worker_init_fn, prefetch_factor=PREFETCH_BATCHES if workers > 0 else None,
        # Workers live for one pass over the loader. Persistent workers would save a second per epoch but
        # outlive the loop that uses them, and a process that exits while they run must kill them.
        persistent_workers=False)


class Normalizer:
    """uint8 NHWC batch on the host -> normalized float NCHW batch on the device, channels_last in memory
    (the permute of an NHWC tensor is exactly that layout, so no copy is made for it)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
        self.inv_std = 1 / (torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        return (images.float() - self.mean) * self.inv_std


def make_demo_dataset(root: Path) -> Path:
    """Write scikit-learn's 1,797 handwritten digits (real scans, 8x8) as 32x32 JPEGs in class folders,
    one in five held out for val. Written to a temporary folder and renamed, so a kill never leaves half a
    dataset; a finished one is reused."""
    if (root / "train").is_dir() and (root / "val").is_dir():
        return root
    from sklearn.datasets import load_digits

    digits = load_digits()
    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        split = "val" if i % 5 == 0 else "train"
        folder = tmp / split / f"digit_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        gray = (pixels * (255 / 16)).clip(0, 255).astype(np.uint8)
        Image.fromarray(gray).resize((32, 32), Image.Resampling.BICUBIC).save(folder / f"{i:04d}.jpg",
                                                                                quality=95)
    try:
        tmp.rename(root)
    except OSError:
        if not (root / "train").is_dir():
            raise
        shutil.rmtree(tmp)  # another process (a DDP rank) finished first; its copy is identical
    return root
