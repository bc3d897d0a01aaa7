"""The "GPU decode" input path: workers only read file bytes and draw the crop box, the training process
decodes and crops whole batches on its own device.

Augmentation is the CPU path's: the crop box and flip of sample i in epoch e come from the same generator
draws as in ImageFolderDataset.load, so only the resampling differs (a full decode and roi_align's area
average instead of PIL's reduced-size decode and bilinear filter). Files the device decoder cannot take
(PNG named .JPEG, CMYK, grayscale, truncated) are decoded by the CPU path in the worker and join the batch
as finished images.

The device's time is shared with training, the workers' is not: device_share < 1 sends only that fraction of
the JPEGs to the device and has the workers decode the rest, so neither side waits for the other.

    loader = make_loader(EncodedImageFolderDataset(..., device_share=0.3), sampler, workers, pin_memory=False,
                         collate_fn=collate_encoded)
    decode = DeviceBatchDecoder(device)
    for images, labels, skipped in loader:
        x = decode(images)  # first: it may rewrite labels and add to skipped, see DeviceBatchDecoder
"""

import io
import math
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.ops import roi_align

from data import (
    BAD_IMAGE_ERRORS,
    ImageFolderDataset,
    Normalizer,
    center_crop_box,
    random_resized_crop_box,
    sample_rng,
)

# Bytes a JPEG may carry after its end-of-image marker without being damaged (some writers pad files).
JPEG_PADDING = b"\x00 \t\r\n"
# Multiples of its fractional part spread over [0, 1) as evenly as any sequence can (the golden-ratio, or
# Weyl, sequence), so any run of consecutive indices holds close to the device share of device-route images.
GOLDEN_RATIO = (1 + 5 ** 0.5) / 2


def is_complete_jpeg(data: bytes) -> bool:
    """A truncated download or copy loses the end-of-image marker; checking for it is free, unlike a decode."""
    return data.rstrip(JPEG_PADDING).endswith(b"\xff\xd9")


@dataclass
class EncodedImage:
    """A file for the device decoder and what the CPU path would have done with it."""
    data: bytes
    path: str
    box: tuple[float, float, float, float]  # left, top, width, height in the file's pixels
    flip: bool
    size: int  # output side
    train: bool


def on_device_route(index: int, device_share: float) -> bool:
    """Whether image `index` is left to the device decoder: a fixed choice per image, so a run's pixels do
    not depend on timing, worker count or where it was resumed."""
    return (index * GOLDEN_RATIO) % 1.0 < device_share


class EncodedImageFolderDataset(ImageFolderDataset):
    """ImageFolderDataset whose items are EncodedImage records for RGB JPEGs on the device route (a
    device_share of all images) and, for every other file, the CPU path's decoded HWC uint8 tensor.
    Unreadable files raise from load as in the base class, whose __getitem__ substitutes (training) or blanks
    (val) them."""

    def __init__(self, *args, device_share: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.device_share = device_share

    def load(self, epoch: int, index: int) -> EncodedImage | torch.Tensor:
        if not on_device_route(index, self.device_share):
            return super().load(epoch, index)
        path = os.fsdecode(self.paths[index])
        with open(path, "rb") as file:
            with Image.open(file) as img:  # reads the header only
                width, height = img.size
                device_decodable = img.format == "JPEG" and img.mode == "RGB"
            file.seek(0)
            data = file.read() if device_decodable else b""
        if not (device_decodable and is_complete_jpeg(data)):
            return super().load(epoch, index)
        if self.train:
            rng = sample_rng(self.seed, epoch, index)  # the same draws, in the same order, as the base class
            box = random_resized_crop_box(rng, width, height, self.min_crop_scale)
            flip = bool(rng.random() < 0.5)
        else:
            box, flip = center_crop_box(width, height, self.image_size), False
        return EncodedImage(data, path, tuple(float(v) for v in box), flip, self.image_size_at(epoch), self.train)


@dataclass
class EncodedBatch:
    """One batch for DeviceBatchDecoder. The device-route files travel as one buffer: each tensor a worker
    sends costs a shared-memory segment and a file descriptor, and a few hundred per batch, times the batches
    in flight, can run the process out of descriptors."""
    data: torch.Tensor  # uint8, the files back to back
    lengths: list[int]
    paths: list[str]
    positions: torch.Tensor  # int64 (N,): where each file's image goes in the batch
    boxes: torch.Tensor  # float64 (N, 4): left, top, width, height in the file's pixels
    flips: torch.Tensor  # bool (N,)
    decoded: torch.Tensor  # uint8 (M, size, size, 3): images the workers decoded
    decoded_positions: torch.Tensor  # int64 (M,)
    image_size: int
    train: bool  # a file that fails to decode is replaced (training) or blanked and labelled -1 (val)
    labels: torch.Tensor
    skipped: list[str]

    def encoded(self) -> list[torch.Tensor]:
        """The files as 1-D uint8 tensors (views of `data`), as decode_jpeg takes them."""
        return list(self.data.split(self.lengths))

    def pin_memory(self):
        raise RuntimeError("Use pin_memory=False with collate_encoded: pinning copies the labels tensor and the "
                           "skipped list the loader yields, so a decoder substitution would not reach them "
                           "(and pinned file bytes speed nothing up).")


def collate_encoded(items) -> tuple[EncodedBatch, torch.Tensor, list[str]]:
    """data.collate's (images, labels, skipped) with an EncodedBatch as images. labels and skipped are the
    batch's own objects, so DeviceBatchDecoder's corrections show in both."""
    images, labels, skipped = zip(*items, strict=True)
    files = [(i, im) for i, im in enumerate(images) if isinstance(im, EncodedImage)]
    ready = [(i, im) for i, im in enumerate(images) if isinstance(im, torch.Tensor)]
    size = images[0].size if isinstance(images[0], EncodedImage) else images[0].shape[0]
    batch = EncodedBatch(
        data=torch.from_numpy(np.frombuffer(bytearray().join(im.data for _, im in files), dtype=np.uint8)),
        lengths=[len(im.data) for _, im in files],
        paths=[im.path for _, im in files],
        positions=torch.tensor([i for i, _ in files], dtype=torch.int64),
        boxes=torch.tensor([im.box for _, im in files], dtype=torch.float64).view(-1, 4),
        flips=torch.tensor([im.flip for _, im in files], dtype=torch.bool),
        decoded=torch.stack([im for _, im in ready]) if ready else torch.empty(0, size, size, 3, dtype=torch.uint8),
        decoded_positions=torch.tensor([i for i, _ in ready], dtype=torch.int64),
        image_size=size, train=any(im.train for _, im in files), labels=torch.tensor(labels),
        skipped=[s for per_item in skipped for s in per_item])
    return batch, batch.labels, batch.skipped


class DeviceBatchDecoder:
    """EncodedBatch -> normalized float NCHW batch on `device`, channels_last, like data.Normalizer's output.

    All files are decoded by one decode_jpeg call (nvJPEG on CUDA). If it fails, each file is decoded on
    its own; a file decode_jpeg still rejects is decoded by PIL on the CPU (with a warning). A file PIL
    cannot decode either is reported in batch.skipped and, in training, replaced by another image of the
    same batch (the next one, wrapping), whose label is copied into batch.labels; in val it becomes a blank
    image labelled -1, as in the CPU path. These corrections are made in place, so call the decoder before
    moving the labels to the device or reading skipped.

    Crops are cut and resized together: each crop (plus a pixel of context) is placed in a zero-padded
    canvas and one roi_align with an adaptive sampling grid averages each output pixel's area, which
    filters like an antialiased resize. Crops with a side over max_side are first downscaled on their own,
    so one huge photo cannot make the canvas of the whole batch huge.
    """

    def __init__(self, device: torch.device, max_side: int = 1024):
        self.device = torch.device(device)
        self.max_side = max_side
        self.normalize = Normalizer(self.device)

    def __call__(self, batch: EncodedBatch) -> torch.Tensor:
        size = batch.image_size
        out = torch.empty(len(batch.labels), 3, size, size, device=self.device, memory_format=torch.channels_last)
        if len(batch.decoded):
            out[batch.decoded_positions.to(self.device)] = self.normalize(batch.decoded)
        if not batch.lengths:
            return out
        images = self.decode(batch)
        good = [i for i, image in enumerate(images) if image is not None]
        if good:
            crops = self.crop_and_resize([images[i] for i in good], batch.boxes[good], size)
            flips = batch.flips[good].to(self.device).view(-1, 1, 1, 1)
            crops = torch.where(flips, crops.flip(3), crops)
            out[batch.positions[good].to(self.device)] = (crops - self.normalize.mean) * self.normalize.inv_std
        failed = [int(batch.positions[i]) for i, image in enumerate(images) if image is None]
        if failed:
            self.replace(out, batch, failed)
        return out

    def decode(self, batch: EncodedBatch) -> list[torch.Tensor | None]:
        """CHW uint8 images on the device; None where no decoder could read the file."""
        encoded = batch.encoded()
        if self.device.type == "cuda":
            # nvJPEG writes its outputs on a private stream that does not wait for the current one, so it can
            # overwrite freshly freed memory that queued kernels (the last training step) still read
            # (pytorch/vision#9606, still in torchvision 0.28). Draining the stream first rules that out.
            torch.cuda.current_stream(self.device).synchronize()
        try:
            return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError:
            # One bad file fails the whole call without saying which: find it (and report it) file by file.
            return [self.decode_one(data, path, batch.skipped) for data, path in zip(encoded, batch.paths,
                                                                                    strict=True)]

    def decode_one(self, data: torch.Tensor, path: str, skipped: list[str]) -> torch.Tensor | None:
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as err:
            decoder_error = err
        try:
            with Image.open(io.BytesIO(data.numpy())) as img:
                pixels = torch.from_numpy(np.array(img.convert("RGB"), dtype=np.uint8))
        except BAD_IMAGE_ERRORS as err:
            skipped.append(f"{path} ({type(err).__name__}: {err})")
            return None
        warnings.warn(f"decode_jpeg could not read {path} ({decoder_error}); decoded it with PIL on the CPU",
                      RuntimeWarning, stacklevel=2)
        return pixels.permute(2, 0, 1).to(self.device)

    def crop_and_resize(self, images: list[torch.Tensor], boxes: torch.Tensor, size: int) -> torch.Tensor:
        """Float (N, 3, size, size) in [0, 255]: the box of each CHW uint8 image resized to size x size."""
        pieces, rois = [], []
        for image, (left, top, width, height) in zip(images, boxes.tolist(), strict=True):
            # The crop's pixels and one more on each side, which the interpolation at its edges reads.
            x0, y0 = max(math.floor(left) - 1, 0), max(math.floor(top) - 1, 0)
            x1, y1 = min(math.ceil(left + width) + 1, image.shape[2]), min(math.ceil(top + height) + 1, image.shape[1])
            piece, scale_x, scale_y = image[:, y0:y1, x0:x1], 1.0, 1.0
            if max(piece.shape[1:]) > self.max_side:
                shrink = self.max_side / max(piece.shape[1:])
                h, w = max(round(piece.shape[1] * shrink), 1), max(round(piece.shape[2] * shrink), 1)
                scale_x, scale_y = w / piece.shape[2], h / piece.shape[1]
                piece = F.interpolate(piece[None].float(), size=(h, w), mode="bilinear", antialias=True)[0]
            pieces.append(piece)
            rois.append((len(rois), (left - x0) * scale_x, (top - y0) * scale_y,
                         (left + width - x0) * scale_x, (top + height - y0) * scale_y))
        heights = torch.tensor([p.shape[1] for p in pieces])
        widths = torch.tensor([p.shape[2] for p in pieces])
        canvas = torch.zeros(len(pieces), 3, int(heights.max()), int(widths.max()), device=self.device)
        for i, piece in enumerate(pieces):
            canvas[i, :, :piece.shape[1], :piece.shape[2]] = piece
        # Samples near a piece's right or bottom edge interpolate with the next column or row, which is
        # padding: repeat the edge there, as resizers do at an image border, rather than blend in black.
        # (roi_align itself clamps at the canvas border and at the left and top.)
        n = torch.arange(len(pieces))
        short = widths < canvas.shape[3]
        canvas[n[short], :, :, widths[short]] = canvas[n[short], :, :, widths[short] - 1]
        short = heights < canvas.shape[2]
        canvas[n[short], :, heights[short], :] = canvas[n[short], :, heights[short] - 1, :]
        rois = torch.tensor(rois, dtype=torch.float32, device=self.device)
        return roi_align(canvas, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)

    def replace(self, out: torch.Tensor, batch: EncodedBatch, failed: list[int]) -> None:
        if not batch.train:
            out[failed] = -self.normalize.mean * self.normalize.inv_std  # a black image, normalized
            batch.labels[failed] = -1
            return
        usable = [i for i in range(len(batch.labels)) if i not in failed]
        if not usable:
            raise RuntimeError("No image of this batch could be decoded:\n" + "\n".join(batch.skipped))
        for i in failed:
            source = next((u for u in usable if u > i), usable[0])
            out[i] = out[source]
            batch.labels[i] = batch.labels[source]
