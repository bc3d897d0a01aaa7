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
        x, labels, skipped = model_batch(decode, images, labels, skipped)  # see DeviceBatchDecoder.decode_batch
"""

import dataclasses
import io
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

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

    def shared_bytes_per_image(self) -> int:
        """The device route's images travel as their JPEG files (the mean size of a sample of them), the rest as
        the workers' decoded crops."""
        sample = self.paths[::max(1, len(self.paths) // 256)]
        file_bytes = sum(os.stat(path).st_size for path in sample) / max(1, len(sample))
        return round(self.device_share * file_bytes + (1 - self.device_share) * super().shared_bytes_per_image())

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

    def encoded(self) -> list[torch.Tensor]:
        """The files as 1-D uint8 tensors (views of `data`), as decode_jpeg takes them."""
        return list(self.data.split(self.lengths))

    def pin_memory(self) -> "EncodedBatch":
        """What the DataLoader's pinning thread calls (pin_memory=True): the images the workers decoded, and
        where they go, in pinned memory, which the step loop copies to the GPU whole without waiting for it.
        The files stay where they are: the decoders read them on the host."""
        return dataclasses.replace(self, decoded=self.decoded.pin_memory(),
                                   decoded_positions=self.decoded_positions.pin_memory())


def collate_encoded(items) -> tuple[EncodedBatch, torch.Tensor, list[str]]:
    """data.collate's (images, labels, skipped) with an EncodedBatch as images."""
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
        image_size=size, train=any(im.train for _, im in files))
    return batch, torch.tensor(labels), [s for per_item in skipped for s in per_item]


class DeviceBatchDecoder:
    """EncodedBatch -> normalized float NCHW batch on `device`, channels_last, like data.Normalizer's output.

    Nothing here makes the host wait for the training steps queued on the GPU, except the one drain that
    decode() explains: every host tensor goes to the device through to_device.

    All files are decoded by one decode_jpeg call (nvJPEG on CUDA). If it fails, each file is decoded on
    its own; a file decode_jpeg still rejects is decoded by PIL on the CPU (with a warning). A file PIL
    cannot decode either is reported in skipped and, in training, replaced by another image of the same
    batch (the next one, wrapping), whose label it takes; in val it becomes a blank image labelled -1, as in
    the CPU path. decode_batch returns those corrections with the images.

    Crops are cut and resized together: each crop (plus a pixel of context) is placed in a zero-padded
    canvas and one roi_align with an adaptive sampling grid averages each output pixel's area, which
    filters like an antialiased resize. Crops with a side over max_side are first downscaled on their own,
    so one huge photo cannot make the canvas huge.

    The canvas is float32, (images, 3, H, W) with H and W the largest crop sides in the batch. For a whole
    batch of 256 that is 3.2 GB once crops reach max_side (1024) both ways; on benchmark.py make-data's
    ImageNet-like files (one in ten 1000x750) 1.6 to 2.9 GB, median 2.2 (200 batches of random crops); and
    0.71 to 0.75 GB when every file is 500x375 or 375x500. So the canvas is built for a chunk of images at
    a time, as many as fit in canvas_bytes: the default, 768 MiB, holds 64 images at 1024x1024, and a batch
    of 256 at ImageNet's common 500x375 still goes in one chunk (an extra chunk costs a few small launches and
    copies; the decoder has already waited for the stream, so they do not wait for training).
    """

    def __init__(self, device: torch.device, max_side: int = 1024, canvas_bytes: int = 768 * 2**20):
        self.device = torch.device(device)
        self.max_side = max_side
        self.canvas_bytes = canvas_bytes
        self.normalize = Normalizer(self.device)
        # Imported here rather than at the top: torchvision's ops import torch._dynamo, 1.7 s added to every
        # start of train.py and evaluate.py on a 2-core CPU, and only the device routes decode with torchvision.
        from torchvision.io import ImageReadMode, decode_jpeg
        from torchvision.ops import roi_align
        self.decode_jpeg = partial(decode_jpeg, mode=ImageReadMode.RGB, device=self.device)
        self.roi_align = roi_align

    def decode_batch(self, batch: EncodedBatch, labels: torch.Tensor,
                     skipped: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """(images, labels, skipped) for a loader's (batch, labels, skipped), which are left as they are: the
        labels come back on the device, corrected where a file could not be decoded, and skipped is a new list
        where a file could not be decoded, else the one given."""
        size = batch.image_size
        labels = self.to_device(labels)
        out = self.batch_with_worker_decoded(batch, len(labels))
        if not batch.lengths:
            return out, labels, skipped
        images, unreadable = self.decode(batch)
        good = [i for i, image in enumerate(images) if image is not None]
        if good:
            positions, flips = self.to_device(batch.positions[good]), self.to_device(batch.flips[good])
            for start, end, crops in self.crop_and_resize([images[i] for i in good], batch.boxes[good], size):
                crops = torch.where(flips[start:end].view(-1, 1, 1, 1), crops.flip(3), crops)
                out[positions[start:end]] = (crops - self.normalize.mean) * self.normalize.inv_std
        failed = [int(batch.positions[i]) for i, image in enumerate(images) if image is None]
        if failed:
            skipped = skipped + unreadable
            labels = self.replace(out, labels, batch.train, failed, skipped)
        return out, labels, skipped

    def batch_with_worker_decoded(self, batch: EncodedBatch, images: int) -> torch.Tensor:
        """The output batch, holding already the images the loader workers decoded (the CPU share)."""
        size = batch.image_size
        out = torch.empty(images, 3, size, size, device=self.device, memory_format=torch.channels_last)
        if len(batch.decoded):
            out[self.to_device(batch.decoded_positions)] = self.normalize(self.to_device(batch.decoded))
        return out

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        """A host tensor on the device, copied without making the host wait. A copy from pageable memory keeps
        the host waiting until the GPU has run the training steps queued before it, so the loop cannot queue
        the next step ahead: the tensor is pinned first, unless the loader's pinning thread did so already
        (pin_memory then returns it as it is). torch's pinned allocator keeps a freed pinned block from reuse
        until the copy that reads it has run, so no later batch can overwrite it in flight."""
        if self.device.type == "cuda":
            host = host.pin_memory()
        return host.to(self.device, non_blocking=True)

    def decode(self, batch: EncodedBatch) -> tuple[list[torch.Tensor | None], list[str]]:
        """CHW uint8 images on the device, None where no decoder could read the file; and a line for each
        of those files."""
        encoded, unreadable = batch.encoded(), []
        if self.device.type == "cuda":
            # nvJPEG writes its outputs on a private stream that does not wait for the current one, so it can
            # overwrite freshly freed memory that queued kernels (the last training step) still read
            # (pytorch/vision#9606, still in torchvision 0.28). Draining the stream first rules that out.
            torch.cuda.current_stream(self.device).synchronize()
        try:
            return self.decode_jpeg(encoded), unreadable
        except torch.OutOfMemoryError:
            raise
        except RuntimeError:
            # One bad file fails the whole call without saying which: find it (and report it) file by file.
            return [self.decode_one(data, path, unreadable) for data, path in zip(encoded, batch.paths,
                                                                                 strict=True)], unreadable

    def decode_one(self, data: torch.Tensor, path: str, skipped: list[str]) -> torch.Tensor | None:
        try:
            return self.decode_jpeg(data)
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
        return self.to_device(pixels.permute(2, 0, 1))

    def crop_and_resize(self, images: list[torch.Tensor], boxes: torch.Tensor,
                        size: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(start, end, crops) for consecutive chunks of the images: crops is float (end - start, 3, size,
        size) in [0, 255], the box of each CHW uint8 image resized to size x size."""
        regions, rois = [], []
        for image, (left, top, width, height) in zip(images, boxes.tolist(), strict=True):
            # The crop's pixels and one more on each side, which the interpolation at its edges reads.
            x0, y0 = max(math.floor(left) - 1, 0), max(math.floor(top) - 1, 0)
            x1, y1 = min(math.ceil(left + width) + 1, image.shape[2]), min(math.ceil(top + height) + 1, image.shape[1])
            h, w, scale_x, scale_y = y1 - y0, x1 - x0, 1.0, 1.0
            if max(h, w) > self.max_side:
                shrink = self.max_side / max(h, w)
                h, w = max(round(h * shrink), 1), max(round(w * shrink), 1)
                scale_x, scale_y = w / (x1 - x0), h / (y1 - y0)
            regions.append((x0, y0, x1, y1, h, w))
            rois.append(((left - x0) * scale_x, (top - y0) * scale_y, (left + width - x0) * scale_x,
                         (top + height - y0) * scale_y))
        # Every chunk's canvas has the whole batch's sides. At a canvas border roi_align clamps, where inside
        # it blends the repeated edge below; the two differ in the last bits (up to 5e-5 of 255), so with
        # canvases sized per chunk an image's pixels would depend on which chunk it landed in.
        canvas_h, canvas_w = max(r[4] for r in regions), max(r[5] for r in regions)
        chunk = max(1, self.canvas_bytes // (3 * canvas_h * canvas_w * 4))
        for start in range(0, len(images), chunk):
            end = min(start + chunk, len(images))
            canvas = torch.zeros(end - start, 3, canvas_h, canvas_w, device=self.device)
            for i in range(start, end):
                x0, y0, x1, y1, h, w = regions[i]
                piece = images[i][:, y0:y1, x0:x1]
                if (h, w) != (y1 - y0, x1 - x0):
                    piece = F.interpolate(piece[None].float(), size=(h, w), mode="bilinear", antialias=True)[0]
                canvas[i - start, :, :h, :w] = piece
            # Samples near a piece's right or bottom edge interpolate with the next column or row, which is
            # padding: repeat the edge there, as resizers do at an image border, rather than blend in black.
            # (roi_align itself clamps at the canvas border and at the left and top.)
            # The indices are chosen on the host: a mask made on the device would make the host wait for it.
            heights = torch.tensor([r[4] for r in regions[start:end]])
            widths = torch.tensor([r[5] for r in regions[start:end]])
            n = torch.arange(end - start)
            short = widths < canvas_w
            rows, columns = self.to_device(n[short]), self.to_device(widths[short])
            canvas[rows, :, :, columns] = canvas[rows, :, :, columns - 1]
            short = heights < canvas_h
            rows, lines = self.to_device(n[short]), self.to_device(heights[short])
            canvas[rows, :, lines, :] = canvas[rows, :, lines - 1, :]
            chunk_rois = self.to_device(torch.tensor([(i - start, *rois[i]) for i in range(start, end)],
                                                     dtype=torch.float32))
            yield start, end, self.roi_align(canvas, chunk_rois, output_size=(size, size), spatial_scale=1.0,
                                        sampling_ratio=-1, aligned=True)

    def replace(self, out: torch.Tensor, labels: torch.Tensor, train: bool, failed: list[int],
                skipped: list[str]) -> torch.Tensor:
        """The labels after the images at `failed` are blanked (val) or replaced (training) in out."""
        labels = labels.clone()
        if not train:
            blanked = self.to_device(torch.tensor(failed))
            out[blanked] = -self.normalize.mean * self.normalize.inv_std  # a black image, normalized
            labels[blanked] = -1
            return labels
        usable = [i for i in range(len(labels)) if i not in failed]
        if not usable:
            raise RuntimeError("No image of this batch could be decoded:\n" + "\n".join(skipped))
        for i in failed:
            source = next((u for u in usable if u > i), usable[0])
            out[i] = out[source]
            labels[i] = labels[source]
        return labels


def model_batch(to_model_input, images, labels: torch.Tensor,
                skipped: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """A loader's (images, labels, skipped) as the training loop uses them: the model's input on its device,
    and the labels (on the device too where a route decodes there) and skipped files that go with it. A route
    that decodes in the training process can find a file unreadable there and exposes decode_batch to say so;
    the CPU path's data.Normalizer has nothing to correct."""
    decode_batch = getattr(to_model_input, "decode_batch", None)
    if decode_batch is None:
        return to_model_input(images), labels, skipped
    return decode_batch(images, labels, skipped)
