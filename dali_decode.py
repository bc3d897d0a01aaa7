"""The "DALI decode" input path: workers only read file bytes and draw the crop window, NVIDIA DALI decodes,
crops, resizes, flips and normalizes whole batches in the training process.

It is gpu_decode's route with another decoder. The loader side is the same (EncodedImageFolderDataset,
collate_encoded): the crop window and flip of sample i in epoch e are the CPU path's draws from
(seed, epoch, index), so a run resumes exactly whichever route decodes; files the JPEG decoders cannot be
trusted with (PNG named .JPEG, CMYK, grayscale, a missing end marker) are decoded by the CPU path in the
worker and join the batch as finished images. Only the batch decoder differs: on a GPU, DALI's "mixed"
decoder sends most JPEGs to the hardware JPEG engines of A100/H100/H200-class chips, which training does not
use, instead of taking CUDA-core time from it as nvJPEG on the CUDA cores does (DESIGN.md, "GPU JPEG decode").
Without a GPU the same pipeline runs on DALI's CPU operators, which is how the tests run it.

nvidia-dali is optional (requirements-dali.txt): this module imports without it, and dali_missing() says why
it cannot be used.

    loader = make_loader(EncodedImageFolderDataset(...), sampler, workers, pin_memory=False,
                         collate_fn=collate_encoded)
    decode = DaliBatchDecoder(device)
    for images, labels, skipped in loader:
        x = decode(images)  # first: it may rewrite labels and add to skipped, as DeviceBatchDecoder does
"""

import functools
import io
import math
import warnings

import numpy as np
import torch
from PIL import Image

from config import UsageError
from data import BAD_IMAGE_ERRORS, IMAGENET_MEAN, IMAGENET_STD
from gpu_decode import DeviceBatchDecoder, EncodedBatch

# The fraction of the JPEGs DALI's mixed decoder gives the hardware JPEG engines; the rest are decoded by
# nvJPEG on the CUDA cores, helped by this process's CPU threads. DALI's default (0.65) maximizes decoding
# alone, where the CUDA cores are idle anyway; here training keeps them busy, and every image decoded there is
# time taken from training (about 28% of a step for a whole batch, DESIGN.md), while the engines would
# otherwise sit idle. So nearly everything goes to the engines, keeping a tenth on the CUDA cores so that a
# stall of the engines cannot stall the batch. Not yet measured on a GPU: benchmark.py train is the check.
HW_DECODER_LOAD = 0.9
# On a GPU these threads parse the files and Huffman-decode the CUDA cores' share; the engines do the rest.
GPU_PIPELINE_THREADS = 4


@functools.cache
def dali_missing() -> str | None:
    """Why DALI cannot be imported here (not installed, or its libraries fail to load), or None."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch.torch_utils  # noqa: F401
    except (ImportError, OSError) as err:
        return f"{type(err).__name__}: {err}"
    return None


def hardware_jpeg_decoder(device: torch.device) -> tuple[bool | None, str]:
    """Whether the GPU `device` has hardware JPEG decoders, as its driver reports it through NVML, or None
    where that cannot be found out; and a phrase saying which GPU and how that was found.

    NVML answers nvmlDeviceGetJpgUtilization on GPUs with JPEG engines (A100, A30, Hopper, Ada such as the L4,
    Blackwell: the chips on which nvJPEG's hardware backend, and so DALI's "mixed" decoder, can use them) and
    refuses it as NOT_SUPPORTED on GPUs without (V100, T4, A10G). It also refuses it on a MIG slice, whose
    engines it does not report, so a slice is taken as having none: the safe answer. The query needs no
    CUDA context and finds the device by UUID, so each rank asks about its own GPU whatever
    CUDA_VISIBLE_DEVICES says. The other ways to ask are worse: DALI has no Python query (its older C++
    check was a list of brands and compute capabilities), and creating nvJPEG's hardware backend means
    loading a libnvjpeg whose location and CUDA runtime differ between wheels and containers."""
    index = torch.cuda.current_device() if device.index is None else device.index
    gpu = torch.cuda.get_device_properties(index)
    try:
        import pynvml
    except ImportError:
        return None, "nvidia-ml-py, which asks the driver, is not installed (pip install -r requirements-dali.txt)"
    query = getattr(pynvml, "nvmlDeviceGetJpgUtilization", None)
    if query is None:
        return None, "the installed pynvml predates nvmlDeviceGetJpgUtilization (pip install -r requirements-dali.txt)"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as err:
        return None, f"NVML cannot be used here: {err}"
    try:
        query(pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{gpu.uuid}"))
    except pynvml.NVMLError as err:
        if err.value == pynvml.NVML_ERROR_NOT_SUPPORTED:
            return False, f"NVML reports no JPEG decoder engine on the {gpu.name}"
        return None, f"NVML could not tell for the {gpu.name}: {err}"
    finally:
        pynvml.nvmlShutdown()
    return True, f"NVML reports JPEG decoder engines on the {gpu.name}"


def slice_and_roi(box: tuple[float, float, float, float]) -> tuple[list[int], list[int], list[float], list[float]]:
    """DALI's arguments for one crop window (left, top, width, height, fractional for val): the whole pixels
    to decode, as (x, y) anchor and shape, and the window inside them, as (y, x) start and end for resize.
    The decoded slice never leaves the image, since the window does not."""
    left, top, width, height = box
    x0, y0 = math.floor(left), math.floor(top)
    x1, y1 = math.ceil(left + width), math.ceil(top + height)
    return [x0, y0], [x1 - x0, y1 - y0], [top - y0, left - x0], [top + height - y0, left + width - x0]


class DaliBatchDecoder(DeviceBatchDecoder):
    """EncodedBatch -> normalized float NCHW batch on `device` (channels_last), the contract of
    DeviceBatchDecoder, whose handling of undecodable files it shares: a file DALI rejects is decoded by PIL
    on the CPU (with a warning); one that fails there too is reported in skipped and replaced (training) or
    blanked and labelled -1 (val); decode_batch returns the corrected labels and skipped list.

    DALI decodes only each crop window's pixels, resizes the window to the batch's size with an antialiased
    linear filter (the CPU path's PIL filter), mirrors and normalizes. A pipeline that met an undecodable file
    cannot run again, so it is rebuilt and the batch is decoded file by file to find the culprits. A pipeline
    that cannot be built is no file's fault: that ends the run with a UsageError (see build).
    """

    def __init__(self, device: torch.device):
        super().__init__(device)
        missing = dali_missing()
        if missing:
            raise RuntimeError(f"NVIDIA DALI cannot be used ({missing}); pip install -r requirements-dali.txt")
        self.pipeline, self.max_batch = None, 0
        # The copy of the last batch out of DALI's buffers, queued on the training stream behind the steps
        # already queued there: DALI may reuse or free those buffers once it runs again or is rebuilt, so
        # that waits for the copy. CUDA only.
        self.copied: torch.cuda.Event | None = None

    def decode_batch(self, batch: EncodedBatch, labels: torch.Tensor,
                     skipped: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """DeviceBatchDecoder's contract: (images, labels, skipped), the labels on the device, the loader's
        labels and skipped left as they are."""
        size = batch.image_size
        labels = self.to_device(labels)
        out = self.batch_with_worker_decoded(batch, len(labels))
        if not batch.lengths:
            return out, labels, skipped
        files = [data.numpy() for data in batch.encoded()]
        boxes = [tuple(box) for box in batch.boxes.tolist()]
        flips = batch.flips.tolist()
        unreadable: list[str] = []
        try:
            crops, good = self.run(files, boxes, flips, size), list(range(len(files)))
        except torch.OutOfMemoryError:
            raise
        except RuntimeError:  # DALI does not say which file failed: decode them one by one to find out
            crops, good = self.decode_one_by_one(files, boxes, flips, size, batch.paths, unreadable)
        if good:
            out[self.to_device(batch.positions[good])] = crops.permute(0, 3, 1, 2)
        failed = [int(batch.positions[i]) for i in range(len(files)) if i not in good]
        if failed:
            skipped = skipped + unreadable
            labels = self.replace(out, labels, batch.train, failed, skipped)
        return out, labels, skipped

    def decode_one_by_one(self, files, boxes, flips, size, paths, unreadable: list[str]):
        """(NHWC crops of the files that decode, their indices in the batch's files), after a batch DALI could
        not decode. A file DALI rejects is given to PIL, and added to `unreadable` if PIL rejects it too."""
        crops, good = [], []
        for i, (data, box, flip, path) in enumerate(zip(files, boxes, flips, paths, strict=True)):
            try:
                crops.append(self.run([data], [box], [flip], size))
            except torch.OutOfMemoryError:
                raise
            except RuntimeError:
                try:
                    crops.append(self.decode_with_pil(data, box, flip, size))
                except BAD_IMAGE_ERRORS as err:
                    unreadable.append(f"{path} ({type(err).__name__}: {err})")
                    continue
                warnings.warn(f"DALI could not decode {path}; decoded it with PIL on the CPU", RuntimeWarning,
                              stacklevel=3)
            good.append(i)
        return (torch.cat(crops) if crops else None), good

    def decode_with_pil(self, data: np.ndarray, box, flip: bool, size: int) -> torch.Tensor:
        """The whole file decoded and the window resized by PIL, which matches DALI's output (see the tests)."""
        left, top, width, height = box
        with Image.open(io.BytesIO(data.tobytes())) as img:
            img = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR,
                                            box=(left, top, left + width, top + height))
        if flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = self.to_device(torch.from_numpy(np.array(img, dtype=np.uint8))[None])
        return self.normalize(pixels).permute(0, 2, 3, 1)

    def run(self, files: list[np.ndarray], boxes: list, flips: list[bool], size: int) -> torch.Tensor:
        """Normalized float NHWC crops on the device. Raises RuntimeError (and drops the pipeline, which DALI
        leaves unusable) when a file does not decode."""
        if self.copied is not None:  # first: a rebuild below frees the old pipeline's buffers
            self.copied.synchronize()
        if self.pipeline is None or len(files) > self.max_batch:
            self.max_batch = max(len(files), self.max_batch)
            self.pipeline = self.build(self.max_batch)
        windows = [slice_and_roi(box) for box in boxes]
        feed = {"files": files,
                "anchors": [np.array(w[0], dtype=np.int32) for w in windows],
                "shapes": [np.array(w[1], dtype=np.int32) for w in windows],
                "roi_starts": [np.array(w[2], dtype=np.float32) for w in windows],
                "roi_ends": [np.array(w[3], dtype=np.float32) for w in windows],
                "sizes": [np.array([size, size], dtype=np.float32)] * len(files),
                "flips": [np.array(flip, dtype=np.int32) for flip in flips]}
        try:
            for name, samples in feed.items():
                self.pipeline.feed_input(name, samples)
            (images,) = self.pipeline.run()
        except RuntimeError:
            self.pipeline = None
            raise
        return self.to_torch(images.as_tensor())

    def to_torch(self, images) -> torch.Tensor:
        from nvidia.dali.plugin.pytorch.torch_utils import feed_ndarray

        crops = torch.empty(images.shape(), dtype=torch.float32, device=self.device)
        if self.device.type != "cuda":
            return feed_ndarray(images, crops)
        # On the stream the training step runs on, so that the batch is ordered with it like any tensor.
        stream = torch.cuda.current_stream(self.device)
        feed_ndarray(images, crops, cuda_stream=stream)
        self.copied = torch.cuda.Event()
        self.copied.record(stream)
        return crops

    def build(self, max_batch: int):
        """The pipeline, built before any file is fed to it: so a failure here is the route's, not a file's
        (no GPU memory, a DALI that does not match the driver), and every later batch would meet it again.
        Raised as a UsageError, which ends the run at once with the way out, instead of each file of each
        batch being decoded by PIL in this process, at a crawl."""
        try:
            return self.build_pipeline(max_batch)
        except RuntimeError as err:
            # DALI appends its C++ stack trace to the message: the first part is the reason.
            reason = " ".join(str(err).split("Stacktrace")[0].split())
            raise UsageError(
                f"NVIDIA DALI could not build its decoding pipeline on {self.device} ({type(err).__name__}: "
                f"{reason}). This is a problem of the DALI install, the driver or the GPU, not of the data. Pass "
                f"--decode cpu (the loader workers decode) or --decode gpu (nvJPEG on the CUDA cores), or "
                f"reinstall DALI with `pip install -r requirements-dali.txt`.") from err

    def build_pipeline(self, max_batch: int):
        """External inputs for the files, their windows, the output size and the flips; decode of the window's
        pixels, antialiased resize, mirror and normalization, float HWC out."""
        from nvidia.dali import Pipeline, fn, types

        on_gpu = self.device.type == "cuda"
        device_id = None
        if on_gpu:
            device_id = torch.cuda.current_device() if self.device.index is None else self.device.index
        # Synchronous: each batch is decoded when the loop asks for it, so nothing is fed ahead of the loader
        # (which already prefetches), and an error belongs to the batch just fed.
        pipeline = Pipeline(batch_size=max_batch, device_id=device_id,
                            num_threads=GPU_PIPELINE_THREADS if on_gpu else torch.get_num_threads(),
                            exec_async=False, exec_pipelined=False, prefetch_queue_depth=1)
        with pipeline:
            files = fn.external_source(name="files", dtype=types.UINT8, ndim=1)
            anchors = fn.external_source(name="anchors", dtype=types.INT32, ndim=1)
            shapes = fn.external_source(name="shapes", dtype=types.INT32, ndim=1)
            roi_starts = fn.external_source(name="roi_starts", dtype=types.FLOAT, ndim=1)
            roi_ends = fn.external_source(name="roi_ends", dtype=types.FLOAT, ndim=1)
            sizes = fn.external_source(name="sizes", dtype=types.FLOAT, ndim=1)
            flips = fn.external_source(name="flips", dtype=types.INT32, ndim=0)
            gpu_options = dict(
                hw_decoder_load=HW_DECODER_LOAD,
                # The CUDA decoder's default chroma upsampling differs from libjpeg-turbo's (and PIL's), which the
                # CPU decoder and the CPU path use; the same pixels on every route.
                jpeg_fancy_upsampling=True,
                # Pinning the decoder's threads to cores helps only where they own those cores; here the loader
                # workers and the other ranks share them.
                affine=False)
            # adjust_orientation=False: the windows were drawn on the stored width and height, as the CPU path
            # (PIL) decodes, ignoring EXIF orientation.
            images = fn.decoders.image_slice(files, anchors, shapes, device="mixed" if on_gpu else "cpu",
                                             normalized_anchor=False, normalized_shape=False, adjust_orientation=False,
                                             output_type=types.RGB, **(gpu_options if on_gpu else {}))
            images = fn.resize(images, size=sizes, roi_start=roi_starts, roi_end=roi_ends, antialias=True,
                               interp_type=types.INTERP_LINEAR)
            images = fn.crop_mirror_normalize(images, mirror=flips, dtype=types.FLOAT, output_layout="HWC",
                                              mean=[255 * m for m in IMAGENET_MEAN],
                                              std=[255 * s for s in IMAGENET_STD])
            pipeline.set_outputs(images)
        pipeline.build()
        return pipeline
