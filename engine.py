"""The parts of training that every script shares: the model and its optimizer, one training step, the
evaluation pass, and the input pipeline that turns JPEG folders into batches on the device. train.py,
lr_finder.py, evaluate.py and benchmark.py build on these, so a change to the step is made once.
"""

import copy
import os
import signal
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from config import Config, UsageError
from dali_decode import DaliBatchDecoder, dali_missing, hardware_jpeg_decoder
from data import (
    ImageFolderDataset,
    Normalizer,
    TrainBatchSampler,
    ValBatchSampler,
    collate,
    make_loader,
    progressive_image_size,
    simplejpeg_missing,
    usable_cores,
)
from gpu_decode import DeviceBatchDecoder, EncodedImageFolderDataset, collate_encoded, model_batch
from model import ARCHITECTURES, narrowed_to
from recipes import LAYERWISE_OPTIMIZERS, WeightAverage, parameter_groups
from runtime import AMP_DTYPES, Runtime, all_reduce, log, resolve_precision

# ---------------------------------------------------------------------------------------------------- threads


def loader_workers(requested: int, rt: Runtime) -> int:
    """--workers, or for -1 this process's share of the cores: on a GPU all but one (the main process feeds
    the GPU), on the CPU one (the rest compute)."""
    cores = max(1, usable_cores() // rt.local_world_size)
    return requested if requested >= 0 else 1 if rt.device.type == "cpu" else max(1, cores - 1)


def split_cores(requested_workers: int, rt: Runtime, threads: int = 0) -> int:
    """The loader workers for this process, and, on the CPU, torch's compute threads: `threads` when given,
    else the cores the workers leave. Compute threads spin while they wait for each other; sharing cores with
    busy loader workers or other ranks makes them over ten times slower (measured on 2 cores)."""
    workers = loader_workers(requested_workers, rt)
    if rt.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(threads or max(1, cores_per_process(rt) - workers))
    return workers


def cores_per_process(rt: Runtime) -> int:
    return max(1, usable_cores() // rt.local_world_size)


def threads_for(seconds_leaving_workers_cores: float, seconds_on_every_core: float, cores: int, workers: int) -> int:
    """Every core computes only where that measurably wins with the loader running beside it: in a step that
    dwarfs the loader the workers idle most of the time; where they are busy, compute threads that share
    their cores spin and run many times slower (over 10x measured on 2 cores)."""
    return cores if seconds_on_every_core < seconds_leaving_workers_cores / 1.25 else max(1, cores - workers)


# ---------------------------------------------------------------------------------------------------- model

@dataclass
class Training:
    """What one training step needs. raw_model is the bare network: saved, evaluated and averaged; model is
    what the step runs (raw_model itself, or wrapped by DDP and torch.compile)."""
    raw_model: torch.nn.Module
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    criterion: torch.nn.Module
    ema: WeightAverage | None
    precision: str  # bf16, fp16 or fp32: what --precision resolved to on this device
    amp_dtype: torch.dtype | None  # autocast's dtype; None runs in fp32


def build_model(cfg: Config, num_classes: int, pruned_weights: dict | None = None) -> torch.nn.Module:
    """Seeded first, so the initial weights are a function of --seed alone. pruned_weights: the state_dict of a
    channel-pruned network (prune.py), whose layer widths the model takes."""
    torch.manual_seed(cfg.seed)
    model = ARCHITECTURES[cfg.arch](num_classes=num_classes)
    return narrowed_to(model, pruned_weights) if pruned_weights is not None else model


def timm_optimizers(name: str):
    """timm's optim package, which holds the LARS and LAMB used here. requirements.txt installs it; a stock
    GPU image may lack it, and SGD and AdamW need only torch, so only these two are refused without it."""
    try:
        import timm.optim
    except ImportError as err:
        raise UsageError(f"--optimizer {name} uses timm's implementation, and timm cannot be imported here ({err}). "
                         f"Install it with `pip install 'timm>=1.0,<2'`, or choose --optimizer sgd or adamw, "
                         f"which need only PyTorch.") from err
    return timm.optim


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """--optimizer over recipes.parameter_groups' two groups: 2-D and larger weights, and the 1-D BatchNorm
    parameters and biases. timm's Lars and Lamb apply the trust ratio, and the decay, only to a group with
    non-zero weight decay or always_adapt set. So under LARS and LAMB the weights always adapt, and the 1-D group
    has zero decay whatever --bias-decay says: it takes plain momentum (LARS) or Adam (LAMB) steps, as in MLPerf's
    and "ResNet strikes back"'s recipes. A trust ratio on BatchNorm's scales and shifts (norms near 1 and 0)
    would freeze or blow up their steps. AdamW's decay is decoupled (w -= lr * decay * w beside the Adam step)."""
    layerwise = cfg.optimizer in LAYERWISE_OPTIMIZERS
    weights, vectors = parameter_groups(model, cfg.weight_decay, cfg.bias_decay and not layerwise)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD([weights, vectors], lr=cfg.lr, momentum=cfg.momentum)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW([weights, vectors], lr=cfg.lr, betas=(cfg.momentum, 0.999))
    timm_optim = timm_optimizers(cfg.optimizer)
    weights["always_adapt"], vectors["always_adapt"] = True, False
    if cfg.optimizer == "lars":
        # trust coefficient 0.001 and no LARC clipping, as in MLPerf's ResNet-50 runs.
        return timm_optim.Lars([weights, vectors], lr=cfg.lr, momentum=cfg.momentum, trust_coeff=0.001)
    # timm's default clipping of the global gradient norm to 1.0 stays: "ResNet strikes back" trained with it.
    return timm_optim.Lamb([weights, vectors], lr=cfg.lr, betas=(cfg.momentum, 0.999), max_grad_norm=1.0)


def build_training(raw_model: torch.nn.Module, cfg: Config, rt: Runtime, channels_last: bool = True) -> Training:
    device = rt.device
    precision = resolve_precision(cfg.precision, device)
    amp_dtype = AMP_DTYPES[precision]
    raw_model = raw_model.to(device)
    if device.type == "cuda":
        if channels_last:  # the layout tensor cores read without transposing; ~2x faster in bf16
            raw_model = raw_model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    optimizer = build_optimizer(raw_model, cfg)
    ema = WeightAverage(raw_model, cfg.ema_decay) if cfg.ema_decay else None
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    model = raw_model
    if rt.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(raw_model,
                                                          device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        model = compile_model(model, cfg)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    return Training(raw_model, model, optimizer, scaler, criterion, ema, precision, amp_dtype)


def compile_model(model: torch.nn.Module, cfg: Config) -> torch.nn.Module:
    """torch.compile with one static graph per training image size. Left to itself, dynamo recompiles at the
    second size with symbolic height and width and runs that slower, general graph for every size after it;
    progressive resizing changes the size only a few times a run, each then compiled once for its own shape.
    Beyond its recompile limit (8 graphs per function by default) dynamo falls back to eager, so the limit is
    raised to the number of sizes this run trains at. Validation runs the bare model, eagerly, and adds no graph."""
    sizes = {progressive_image_size(epoch, cfg.epochs, cfg.start_image_size, cfg.image_size)
             for epoch in range(cfg.epochs)}
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(sizes))
    return torch.compile(model, dynamic=False, backend=cfg.compile_backend)


def train_step(t: Training, x: torch.Tensor, labels: torch.Tensor, lr: float, step: int):
    """One optimizer step at learning rate lr; returns the (detached) loss and logits. Nothing here waits for
    the device, so the host can queue the next step while this one runs."""
    for group in t.optimizer.param_groups:
        group["lr"] = lr
    with torch.autocast(x.device.type, dtype=t.amp_dtype, enabled=t.amp_dtype is not None):
        logits = t.model(x)
        loss = t.criterion(logits, labels)
    t.optimizer.zero_grad(set_to_none=True)
    t.scaler.scale(loss).backward()
    t.scaler.step(t.optimizer)
    t.scaler.update()
    if t.ema:
        t.ema.update(step)
    return loss.detach(), logits.detach()


def accuracy_counts(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hits = top5 == labels[:, None]
    return hits[:, 0].sum(), hits.any(dim=1).sum()


@torch.no_grad()
def evaluate_models(models: list[torch.nn.Module], loader, to_model_input, amp_dtype: torch.dtype | None,
                    flip: bool = False) -> list[dict]:
    """Loss, top-1 and top-5 of each model over this rank's share of `loader`, summed over all ranks: exact
    counts, no padded duplicates. Several models share one pass over the data, so decoding is paid once.
    flip=True averages the logits of each image and its mirror image."""
    device = to_model_input.device
    modes = [m.training for m in models]
    for model in models:
        model.eval()
    sums = torch.zeros(len(models), 5, dtype=torch.float64, device=device)
    for images, labels, skipped in loader:
        # Decoding on the device may find a file unreadable: then it blanks the image and labels it -1.
        x, labels, skipped = model_batch(to_model_input, images, labels, skipped)
        labels = labels.to(device, non_blocking=True)
        for line in skipped:
            log(f"Skipped an unreadable val image: {line}")
        good = labels >= 0
        for i, model in enumerate(models):
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(x).float()
                if flip:
                    logits = (logits + model(x.flip(3)).float()) / 2
            top1, top5 = accuracy_counts(logits[good], labels[good])
            sums[i] += torch.stack([F.cross_entropy(logits[good], labels[good], reduction="sum").double(),
                                    top1.double(), top5.double(), good.sum().double(), (~good).sum().double()])
    for model, mode in zip(models, modes, strict=True):
        model.train(mode)
    return [{"val_loss": loss / max(images, 1), "val_acc1": 100 * top1 / max(images, 1),
             "val_acc5": 100 * top5 / max(images, 1), "val_images": int(images), "val_skipped": int(skipped)}
            for loss, top1, top5, images, skipped in all_reduce(sums).tolist()]


def check_replicas_agree(raw_model: torch.nn.Module, rt: Runtime, epoch: int) -> None:
    """DDP keeps replicas identical by construction; verify it once per epoch, it costs one all-gather."""
    if rt.world_size == 1:
        return
    fingerprint = torch.stack([t.detach().double().sum() for t in raw_model.state_dict().values()
                               if t.is_floating_point()]).sum()
    gathered = [torch.zeros_like(fingerprint) for _ in range(rt.world_size)]
    dist.all_gather(gathered, fingerprint)
    if any(g != gathered[0] for g in gathered):
        raise RuntimeError(f"Model replicas differ across ranks after epoch {epoch + 1}: "
                           f"{[g.item() for g in gathered]}")
    log(f"Weights identical on all {rt.world_size} ranks (fingerprint {fingerprint.item():.12g}).")


# ---------------------------------------------------------------------------------------------------- input

WORKER_GRACE_SECONDS = 60


def worker_signal_handling(_worker_id: int) -> None:
    """Loader workers must keep serving batches until the main process has finished its step and saved.
    Ctrl-C and a dropped SSH connection's SIGHUP reach the whole process group: workers ignore them. A shutdown
    (spot interruption) sends SIGTERM to every process at once: a worker's first SIGTERM gives it
    WORKER_GRACE_SECONDS more to live, a second one (the loader shutting it down) ends it at once."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    def reprieve(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.alarm(WORKER_GRACE_SECONDS)

    signal.signal(signal.SIGTERM, reprieve)


def decode_on_device(requested: str, device: torch.device) -> bool:
    """--decode gpu takes effect where there is a GPU to decode on."""
    return requested == "gpu" and device.type == "cuda"


def decode_route(requested: str, device: torch.device) -> tuple[str, str]:
    """What --decode means on this device: the route that decodes the JPEGs (cpu: the loader workers; gpu:
    nvJPEG on the CUDA cores; dali: NVIDIA DALI, on the GPU's hardware JPEG engines where it has them), and a
    line saying which and why. auto takes DALI only where it is installed and the driver reports JPEG engines
    on this GPU, else the workers."""
    if requested == "cpu":
        return "cpu", "JPEGs are decoded by the loader workers (--decode cpu)."
    if requested == "gpu":
        if decode_on_device(requested, device):
            return "gpu", "JPEGs are decoded on the GPU by nvJPEG (--decode gpu)."
        return "cpu", "--decode gpu: there is no GPU, so the loader workers decode the JPEGs (--decode cpu)."
    if device.type != "cuda":
        # DALI would run on the CPU too, but in this process, in turn with the training step, while the
        # workers idle.
        return "cpu", f"--decode {requested}: there is no GPU, so the loader workers decode the JPEGs."
    missing = dali_missing()
    if requested == "dali":
        if missing is None:
            return "dali", "--decode dali: NVIDIA DALI decodes the JPEGs on the GPU."
        raise UsageError(f"--decode dali needs NVIDIA DALI, which cannot be imported here ({missing}). Install it "
                         f"with `pip install -r requirements-dali.txt`, or pass --decode cpu or gpu.")
    if missing is not None:
        return "cpu", ("--decode auto: NVIDIA DALI is not installed, so the loader workers decode the JPEGs "
                       "(`pip install -r requirements-dali.txt` lets the GPU's JPEG engines do it).")
    # Without JPEG engines DALI decodes on the CUDA cores, taking their time from training (DESIGN.md, "GPU
    # JPEG decode"), and GPUs without engines are the slower ones; unmeasured there, so the workers keep it.
    has_engines, why = hardware_jpeg_decoder(device)
    if has_engines:
        return "dali", f"--decode auto: NVIDIA DALI decodes the JPEGs on the GPU's hardware JPEG decoder ({why})."
    if has_engines is False:
        return "cpu", (f"--decode auto: the loader workers decode the JPEGs: {why}, so DALI would decode them on "
                       f"the CUDA cores that training uses (--decode dali or gpu does that anyway).")
    return "cpu", (f"--decode auto: the loader workers decode the JPEGs, since whether this GPU has a hardware JPEG "
                   f"decoder is unknown ({why}); --decode dali uses DALI anyway.")


def input_pipeline(decode: str, device: torch.device, gpu_decode_share: float):
    """What --decode means on this device: (dataset class, collate function, pin_memory, to_model_input: the
    callable that turns a collated batch into the model's normalized input on the device)."""
    route, why = decode_route(decode, device)
    log(why)
    if route in ("gpu", "dali"):
        # Pinned by the loader's pinning thread: the labels and the images the workers decoded, which the step
        # loop copies to the GPU (EncodedBatch.pin_memory); not the files, which the decoders read on the host.
        return (partial(EncodedImageFolderDataset, device_share=gpu_decode_share), collate_encoded,
                device.type == "cuda", DeviceBatchDecoder(device) if route == "gpu" else DaliBatchDecoder(device))
    return ImageFolderDataset, collate, device.type == "cuda", Normalizer(device)


class LoaderWait:
    """Iterates a loader, adding up the time the loop is blocked waiting for its next batch. The loop queues
    work on a GPU far ahead of it, so that wait is time the GPU sits idle for want of data."""

    def __init__(self, loader):
        self.loader, self.seconds = loader, 0.0
        self.first_batch_seconds = 0.0  # most of it the workers' start-up, paid once per pass over the loader

    def __iter__(self):
        batches = iter(self.loader)
        try:
            while True:
                start = time.perf_counter()
                batch = next(batches, None)
                self.seconds += time.perf_counter() - start
                if not self.first_batch_seconds:
                    self.first_batch_seconds = self.seconds
                if batch is None:
                    return
                yield batch
        finally:
            # An error raised in a worker comes back inside a reference cycle. Freed later by the cyclic GC, the
            # iterator finds its queues already closed: its workers never hear that they should stop, and are
            # killed after a 5 s timeout by a SIGTERM that buys them WORKER_GRACE_SECONDS. Stop them now.
            shutdown_workers = getattr(batches, "_shutdown_workers", None)  # none without worker processes
            if shutdown_workers:
                shutdown_workers()


@dataclass
class Data:
    train_set: ImageFolderDataset
    sampler: TrainBatchSampler
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader | None
    to_model_input: Normalizer | DeviceBatchDecoder  # use through model_batch: a loader batch -> the model's input


def build_data(cfg: Config, classes: list[str], rt: Runtime, workers: int, with_val: bool = True) -> Data:
    """Loaders over data_dir's train/ (this rank's shard, in the resumable order of data.py) and val/."""
    if simplejpeg_missing():  # every route decodes some files in the workers: refuse here, not in each of them
        raise UsageError(simplejpeg_missing())
    root = Path(cfg.data_dir)
    dataset, collate_fn, pin, to_model_input = input_pipeline(cfg.decode, rt.device, cfg.gpu_decode_share)
    train_set = dataset(root / "train", classes, True, cfg.image_size, cfg.seed, cfg.min_crop_scale,
                        cfg.start_image_size, cfg.epochs)
    sampler = TrainBatchSampler(len(train_set), cfg.batch_size, rt.rank, rt.world_size, cfg.seed)
    if sampler.steps_per_epoch() == 0:
        raise UsageError(f"The training set has {len(train_set)} images, fewer than one global batch "
                         f"({cfg.batch_size} x {rt.world_size} processes); lower --batch-size.")
    train_loader = make_loader(train_set, sampler, workers, pin, worker_signal_handling, collate_fn,
                               processes=rt.local_world_size)
    val_loader = None
    if with_val:
        val_set = dataset(root / "val", classes, False, cfg.eval_image_size or cfg.image_size, cfg.seed)
        val_loader = make_loader(val_set, ValBatchSampler(len(val_set), cfg.batch_size, rt.rank, rt.world_size),
                                 workers, pin, worker_signal_handling, collate_fn, processes=rt.local_world_size)
    return Data(train_set, sampler, train_loader, val_loader, to_model_input)


class StepTimer:
    """Times training steps on a copy of the model, fed by its own loader: the real model, optimizer and RNG
    are untouched once close() has run."""

    def __init__(self, t: Training, data: Data):
        self.rng = torch.get_rng_state()  # a loader iterator draws its workers' base seed from it
        self.criterion, self.to_model_input = t.criterion, data.to_model_input
        self.model = copy.deepcopy(t.raw_model)
        self.batches = iter(data.train_loader)
        next(self.batches)  # the workers' start-up is no step's

    def seconds_per_step(self, threads: int, steps: int) -> float:
        torch.set_num_threads(threads)
        for i in range(steps + 1):  # the first, at a new thread count, is a warm-up
            if i == 1:
                start = time.perf_counter()
            x, labels, _ = model_batch(self.to_model_input, *next(self.batches))
            self.criterion(self.model(x), labels).backward()
        return (time.perf_counter() - start) / steps

    def close(self) -> None:
        torch.set_rng_state(self.rng)


def measure_threads(t: Training, data: Data, rt: Runtime, workers: int, steps: int = 4) -> tuple[int, str, float]:
    """A new CPU run's compute threads: its own step, on a copy of the model, fed by its own loader, timed with
    compute on the cores the workers leave and on every core. Returns the count, the measurement behind it and
    the seconds per step at that count (0, "", 0.0 where there is nothing to choose)."""
    cores = cores_per_process(rt)
    few = max(1, cores - workers)
    if (rt.device.type != "cpu" or few == cores or "OMP_NUM_THREADS" in os.environ
            or data.sampler.steps_per_epoch() < 2 * steps + 3):
        return 0, "", 0.0
    timer = StepTimer(t, data)
    on_few, on_every = timer.seconds_per_step(few, steps), timer.seconds_per_step(cores, steps)
    timer.close()
    threads = threads_for(on_few, on_every, cores, workers)
    return threads, (f"a step took {on_few:.3f} s on {few} and {on_every:.3f} s on {cores} threads beside "
                     f"{workers} workers"), on_every if threads == cores else on_few


def measure_step_seconds(t: Training, data: Data, steps: int = 2) -> float:
    """Seconds per training step at torch's present thread count, as measure_threads times them."""
    timer = StepTimer(t, data)
    seconds = timer.seconds_per_step(torch.get_num_threads(), steps)
    timer.close()
    return seconds
