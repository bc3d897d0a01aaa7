"""Train ResNet-50 on ImageNet-1K (or any ImageNet-style folder) with DDP, mixed precision, OneCycleLR and
exact, automatic resume.

    python train.py                       # every visible GPU; continues from --output-dir if it holds a run
    python train.py --demo                # bundled handwritten digits, runs on a CPU in about a minute
    torchrun --nproc_per_node=8 train.py  # the same through torchrun; several boxes: torchrun --nnodes=...

Rerunning the same command after a kill, a reboot or a spot interruption continues where the last
checkpoint left off, mid-epoch included, with no batch repeated or skipped (see data.py for why that holds).
"""

import argparse
import csv
import gc
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from checkpoint import (
    LATEST,
    PREVIOUS,
    CheckpointError,
    load_latest_checkpoint,
    remove_stale_temporaries,
    save_checkpoint,
)
from data import (
    DataVanishedError,
    ImageFolderDataset,
    Normalizer,
    TrainBatchSampler,
    ValBatchSampler,
    collate,
    make_demo_dataset,
    make_loader,
    usable_cores,
)
from dataset_paths import (
    DEFAULT_DATA_DIR,
    DEFAULT_OUTPUT_DIR,
    DEMO_DATA_DIR,
    DEMO_OUTPUT_DIR,
    DatasetLayoutError,
    check_layout,
)
from gpu_decode import DeviceBatchDecoder, EncodedImageFolderDataset, collate_encoded
from model import ARCHITECTURES
from recipes import (
    INSTANCE_PRICES,
    RECIPES,
    SCHEDULES,
    WeightAverage,
    learning_rate,
    parameter_groups,
    peak_lr,
)

EXIT_BAD_INPUT = 2  # the user can fix it: a data layout, a flag, a checkpoint
EXIT_NON_FINITE = 3  # training diverged; the last good checkpoint is kept


def setting(default, help, **argparse_kwargs):
    return field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclass
class Config:
    data_dir: str = setting(str(DEFAULT_DATA_DIR), "dataset root holding train/<class>/ and val/<class>/")
    output_dir: str = setting(str(DEFAULT_OUTPUT_DIR), "checkpoints, metrics.csv and the plot; resumes from here")
    recipe: str = setting("seed", "preset of the settings below (explicit flags still win): seed = the original "
                                  "50-epoch one-cycle run; fast = fewer epochs at lower resolution (see recipes.py)",
                          choices=list(RECIPES))
    arch: str = setting("resnet50", "network; the small ones are for quick CPU runs", choices=list(ARCHITECTURES))
    epochs: int = setting(50, "passes over the training set")
    batch_size: int = setting(256, "images per GPU (per process) and step")
    lr: float = setting(0.175, "peak learning rate (per --lr-reference-batch images when that is set)")
    lr_reference_batch: int = setting(0, "scale --lr linearly by global batch / this many images; 0: use --lr as is")
    schedule: str = setting("onecycle", "LR schedule: onecycle (cosine up and down), linear or cosine (after a "
                                        "linear warm-up), step (/10 at 1/3, 2/3 and 8/9 of the run)",
                            choices=list(SCHEDULES))
    pct_start: float = setting(0.3, "onecycle: fraction of training spent raising the LR to its peak")
    warmup_epochs: float = setting(0.0, "linear, cosine, step: epochs of linear warm-up to the peak LR")
    div_factor: float = setting(25.0, "the LR starts at lr / div_factor")
    final_div_factor: float = setting(1e4, "onecycle, linear, cosine: the LR ends at lr / div_factor / this")
    momentum: float = setting(0.9, "SGD momentum (held constant, not cycled)")
    weight_decay: float = setting(1e-4, "L2 penalty on conv and fc weights (and on 1-D parameters with --bias-decay)")
    bias_decay: bool = setting(True, "also decay biases and BatchNorm parameters (every 1-D parameter, chosen by "
                                     "shape); --no-bias-decay exempts them", action=argparse.BooleanOptionalAction)
    label_smoothing: float = setting(0.0, "target smoothing for the training loss (validation loss never uses it)")
    ema_decay: float = setting(0.0, "keep an exponential moving average of the weights with this decay per step "
                                    "(e.g. 0.9999), evaluated and saved beside the model; 0: off")
    image_size: int = setting(224, "train crop in pixels; val crops the same after resizing to size / 0.875")
    start_image_size: int = setting(0, "progressive resizing: the train crop of the first epoch, growing linearly "
                                       "to --image-size in the last (multiples of 16); 0: off")
    eval_image_size: int = setting(0, "val crop in pixels (after resizing to size / 0.875); 0: --image-size")
    eval_flip: bool = setting(False, "validate on the average of each image's and its mirror image's logits",
                              action=argparse.BooleanOptionalAction)
    min_crop_scale: float = setting(0.08, "smallest fraction of the image area a random training crop keeps")
    workers: int = setting(-1, "loader processes per GPU; -1: the CPU cores divided among the local processes")
    decode: str = setting("cpu", "where JPEGs are decoded: cpu = in the loader workers; gpu = workers only read the "
                                 "files, batches are decoded, cropped and resized on the GPU (falls back to cpu "
                                 "without one)", choices=["cpu", "gpu"])
    gpu_decode_share: float = setting(1.0, "with --decode gpu: the fraction of the JPEGs decoded on the GPU, the "
                                           "rest by the workers; lower it when training waits for the GPU "
                                           "decoder, raise it when it waits for the workers (benchmark.py train "
                                           "--decode gpu --gpu-decode-share 0,0.25,0.5,1 finds the best)")
    device: str = setting("auto", "cuda if available, else cpu", choices=["auto", "cuda", "cpu"])
    precision: str = setting("auto", "auto: bf16 where the GPU supports it, else fp16 with loss scaling; fp32 on CPU",
                             choices=["auto", "bf16", "fp16", "fp32"])
    compile: bool = setting(False, "torch.compile the model (slower start, faster steps)")
    seed: int = setting(0, "decides initial weights, data order and every augmentation")
    checkpoint_minutes: float = setting(10.0, "also save mid-epoch this often (a checkpoint is always saved per epoch)")
    log_every: int = setting(10, "steps between host syncs: progress bar, stop requests, periodic saves, NaN check")
    usd_per_hour: float = setting(0.0, "what the machine costs per hour; the progress bar and epoch summary then "
                                       "show the money spent and a projection for the whole run")
    instance_type: str = setting("", "take --usd-per-hour from recipes.INSTANCE_PRICES (dated list prices)",
                                 choices=["", *INSTANCE_PRICES])
    no_resume: bool = setting(False, "start a new run; an existing one in --output-dir is moved to a subfolder")
    demo: bool = setting(False, "train on the bundled digits dataset (small network, 32 px) instead of ImageNet")


# What --demo changes unless the flag is given explicitly: a run that learns on a 2-core CPU in about a minute.
# It also switches off a recipe's ImageNet resolutions and LR scaling, which mean nothing for 32 px digits.
DEMO_SETTINGS = dict(data_dir=str(DEMO_DATA_DIR), output_dir=str(DEMO_OUTPUT_DIR), arch="resnet26_narrow",
                     epochs=12, batch_size=64, lr=0.2, lr_reference_batch=0, image_size=32, start_image_size=0,
                     eval_image_size=0, min_crop_scale=0.35)


def add_config_argument(parser: argparse.ArgumentParser, f) -> None:
    """One Config field as a command-line flag, its help and choices taken from the field."""
    flag = "--" + f.name.replace("_", "-")
    kwargs = {k: v for k, v in f.metadata.items() if k != "help"}
    if f.type is bool:
        parser.add_argument(flag, action=kwargs.get("action", "store_true"), help=f.metadata["help"])
    else:
        parser.add_argument(flag, type=f.type, help=f.metadata["help"] + f" (default: {f.default})", **kwargs)


def parse_args(argv: list[str] | None = None) -> tuple[Config, set[str]]:
    """The settings, and the names of those given on the command line (they override a resumed run's)."""
    # SUPPRESS keeps unset flags out of the namespace, so presets can tell their values from explicit flags.
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], argument_default=argparse.SUPPRESS)
    for f in fields(Config):
        add_config_argument(parser, f)
    explicit = vars(parser.parse_args(argv))
    cfg = Config(**{**RECIPES[explicit.get("recipe", "seed")], **(DEMO_SETTINGS if explicit.get("demo") else {}),
                    **explicit})
    if cfg.instance_type and "usd_per_hour" not in explicit:
        cfg.usd_per_hour = INSTANCE_PRICES[cfg.instance_type][0]
    problems = config_problems(cfg)
    if problems:
        parser.error("; ".join(problems))
    return cfg, set(explicit)


def parse_config(argv: list[str] | None = None) -> Config:
    return parse_args(argv)[0]


def config_problems(cfg: Config) -> list[str]:
    problems = [f"--{name.replace('_', '-')} must be positive" for name in
                ("epochs", "batch_size", "lr", "image_size", "log_every", "checkpoint_minutes")
                if getattr(cfg, name) <= 0]
    if cfg.usd_per_hour < 0 or cfg.lr_reference_batch < 0:
        problems.append("--usd-per-hour and --lr-reference-batch cannot be negative")
    if not (cfg.start_image_size == 0 or 16 <= cfg.start_image_size <= cfg.image_size) or cfg.eval_image_size < 0:
        problems.append(f"--start-image-size must be 0 (off) or from 16 to --image-size ({cfg.start_image_size} and "
                        f"{cfg.image_size} given or set by --recipe {cfg.recipe}), --eval-image-size 0 or positive")
    if not 0 < cfg.min_crop_scale <= 1 or not 0 < cfg.pct_start < 1 or not 0 <= cfg.label_smoothing < 1:
        problems.append("--min-crop-scale must be in (0, 1], --pct-start in (0, 1), --label-smoothing in [0, 1)")
    if not 0 <= cfg.warmup_epochs < cfg.epochs or not 0 <= cfg.ema_decay < 1:
        problems.append(f"--warmup-epochs must be in [0, --epochs = {cfg.epochs}), --ema-decay in [0, 1)")
    if not 0 <= cfg.gpu_decode_share <= 1:
        problems.append("--gpu-decode-share must be in [0, 1]")
    return problems


# Settings of this machine or this invocation rather than of the run: a resume takes them from the command
# line or their defaults, never from the checkpoint.
SESSION_SETTINGS = {"data_dir", "output_dir", "workers", "decode", "gpu_decode_share", "device", "compile",
                    "checkpoint_minutes", "log_every", "usd_per_hour", "instance_type", "no_resume", "demo"}


def resumed_config(cfg: Config, saved: dict, explicit: set[str]) -> Config:
    """A resumed run keeps the settings it was started with, so a bare `python train.py` continues a
    `--recipe fast --epochs 40` run as it was; flags given now override them (Trainer.resume announces each).
    A new --recipe brings its own presets and the defaults back for what the old recipe had set."""
    if "recipe" in explicit:
        explicit = explicit | RECIPES[cfg.recipe].keys() | RECIPES.get(saved.get("recipe"), {}).keys()
    names = {f.name for f in fields(Config)} - SESSION_SETTINGS - explicit
    merged = replace(cfg, **{k: v for k, v in saved.items() if k in names})
    problems = config_problems(merged)
    if problems:
        raise UsageError(f"The flags given now do not fit the run in {cfg.output_dir}: " + "; ".join(problems))
    return merged


# ---------------------------------------------------------------------------------------------------- runtime

@dataclass
class Runtime:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def master(self) -> bool:
        return self.rank == 0


RT = Runtime()


def log(message: str) -> None:
    """Every human-readable line goes through here: rank 0 prints, without breaking the progress bar."""
    if RT.master:
        tqdm.write(message, file=sys.stdout)
        sys.stdout.flush()


def format_duration(seconds: float) -> str:
    if seconds >= 5400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def resolve_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was given but no CUDA GPU is visible (check nvidia-smi and the driver).")
    return requested


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def decode_on_device(requested: str, device: torch.device) -> bool:
    """--decode gpu takes effect where there is a GPU to decode on."""
    return requested == "gpu" and device.type == "cuda"


def input_pipeline(decode: str, device: torch.device, gpu_decode_share: float):
    """What --decode means on this device: (dataset class, collate function, pin_memory, the callable that
    turns a collated batch into the model's normalized input on the device)."""
    if decode_on_device(decode, device):
        # The device decoder corrects labels in place (an undecodable file), which pinned copies would not
        # show; file bytes gain nothing from pinning anyway.
        return (partial(EncodedImageFolderDataset, device_share=gpu_decode_share), collate_encoded, False,
                DeviceBatchDecoder(device))
    if decode == "gpu":
        log("--decode gpu: there is no GPU, so the loader workers decode the JPEGs (--decode cpu).")
    return ImageFolderDataset, collate, device.type == "cuda", Normalizer(device)


def resolve_precision(requested: str, device: torch.device) -> str:
    """auto: bf16 where the GPU has it, else fp16 (with loss scaling); fp32 on the CPU."""
    if device.type == "cpu":
        if requested == "fp16":
            raise UsageError("--precision fp16 needs a GPU; use bf16 or fp32 on the CPU.")
        return "fp32" if requested == "auto" else requested
    return ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if requested == "auto" else requested


def setup_distributed(device_type: str) -> Runtime:
    if "RANK" not in os.environ:
        return Runtime(device=torch.device("cuda:0" if device_type == "cuda" else "cpu"))
    rt = Runtime(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]),
                 int(os.environ["LOCAL_WORLD_SIZE"]))
    # torchrun --max-restarts keeps one store for every attempt, and the process group's keys in it carry no
    # attempt number: restarted ranks would read the dead ones' addresses and fail to connect. Name the keys
    # by attempt.
    store, _, _ = next(dist.rendezvous("env://"))
    store = dist.PrefixStore(f"attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    if device_type == "cuda":
        rt.device = torch.device("cuda", rt.local_rank)
        torch.cuda.set_device(rt.device)
        dist.init_process_group("nccl", store=store, rank=rt.rank, world_size=rt.world_size, device_id=rt.device)
    else:
        dist.init_process_group("gloo", store=store, rank=rt.rank, world_size=rt.world_size)
    return rt


def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    if RT.world_size > 1:
        dist.all_reduce(tensor)
    return tensor


class UsageError(Exception):
    """Something the user can fix; printed as one paragraph and exit code 2."""


class StopRequest:
    """SIGTERM (spot interruption notice, `kill`) or Ctrl-C: finish the step, save, exit 0.
    A second Ctrl-C quits at once without saving."""

    def __init__(self):
        self.signal_name = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.handle)

    def handle(self, signum, frame):
        if self.signal_name and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        log(f"{self.signal_name} received: saving a checkpoint after this step (Ctrl-C again quits without saving).")


def worker_signal_handling(_worker_id: int) -> None:
    """Loader workers must keep serving batches until the main process has finished its step and saved.
    Ctrl-C reaches the whole process group: workers ignore it. A shutdown (spot interruption) sends SIGTERM
    to every process at once: a worker's first SIGTERM gives it WORKER_GRACE_SECONDS more to live, a second
    one (the loader shutting it down) ends it at once."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def reprieve(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.alarm(WORKER_GRACE_SECONDS)

    signal.signal(signal.SIGTERM, reprieve)


WORKER_GRACE_SECONDS = 60


# ---------------------------------------------------------------------------------------------------- outputs

METRIC_COLUMNS = ["epoch", "lr", "train_loss", "train_acc1", "train_acc5", "val_loss", "val_acc1", "val_acc5",
                  "epoch_seconds", "images_per_second", "train_images", "val_images", "skipped_images", "image_size",
                  "val_seconds", "ema_val_loss", "ema_val_acc1", "ema_val_acc5", "data_wait_pct"]


def append_metrics(path: Path, rows: list[dict]) -> None:
    """Add the rows whose epoch is not in the file yet: the file keeps its history across resumes and never
    gets a duplicate row, even when a resume repeats an epoch whose checkpoint was lost. The new file is
    written beside the old one and renamed over it, so a full disk or a kill never leaves half a row."""
    kept = []
    if path.exists():
        with open(path, newline="") as f:
            kept = list(csv.DictReader(f))
    done = {int(row["epoch"]) for row in kept}
    new_rows = [row for row in rows if row["epoch"] not in done]
    if not new_rows:
        return
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(kept + new_rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def plot_history(history: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in history], "o-", label="val")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss")
    ax_acc.plot(epochs, [r["train_acc1"] for r in history], "o-", label="train top-1")
    ax_acc.plot(epochs, [r["val_acc1"] for r in history], "o-", label="val top-1")
    ax_acc.plot(epochs, [r["val_acc5"] for r in history], "--", label="val top-5")
    ema_acc1 = [r.get("ema_val_acc1") for r in history]
    if None not in ema_acc1:
        ax_acc.plot(epochs, ema_acc1, "o:", label="val top-1, weight average")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def move_run_aside(output_dir: Path) -> None:
    """--no-resume never destroys a previous run: its files go to a timestamped subfolder."""
    old = [output_dir / n for n in (LATEST, PREVIOUS, "metrics.csv", "training_curves.png")]
    old = [p for p in old if p.exists()]
    if old:
        archive = output_dir / time.strftime("previous-%Y%m%d-%H%M%S")
        archive.mkdir()
        for p in old:
            os.replace(p, archive / p.name)
        log(f"--no-resume: moved the previous run's files to {archive}")


# ---------------------------------------------------------------------------------------------------- training

class LoaderWait:
    """Iterates a loader, adding up the time the loop is blocked waiting for its next batch. The loop queues
    work on a GPU far ahead of it, so that wait is time the GPU sits idle for want of data."""

    def __init__(self, loader):
        self.loader, self.seconds = loader, 0.0

    def __iter__(self):
        batches = iter(self.loader)
        while True:
            start = time.perf_counter()
            batch = next(batches, None)
            self.seconds += time.perf_counter() - start
            if batch is None:
                return
            yield batch


def data_wait_advice(fraction: float, decode: str, gpu_decode_share: float, device_type: str, workers: int) -> str:
    """What to try when training waited for data more than a tenth of the time, or when the GPU decodes
    JPEGs that idle workers could have decoded instead."""
    if fraction < 0.02 and device_type == "cuda" and decode == "gpu" and gpu_decode_share > 0:
        return (f"; the workers keep up, so a --gpu-decode-share below {gpu_decode_share:g} may leave more of the "
                f"GPU to training")
    if fraction < 0.1:
        return ""
    if device_type == "cuda" and decode == "cpu":
        return "; the loader workers cannot keep up: try --decode gpu"
    if device_type == "cuda" and gpu_decode_share < 1:
        return f"; the loader workers cannot keep up: raise --gpu-decode-share above {gpu_decode_share:g}"
    return f"; the loader cannot keep up: try more --workers than {workers} if cores are idle, or a faster disk"


def accuracy_counts(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hits = top5 == labels[:, None]
    return hits[:, 0].sum(), hits.any(dim=1).sum()


@torch.no_grad()
def evaluate(models: list[torch.nn.Module], loader, normalize: Normalizer | DeviceBatchDecoder,
             amp_dtype: torch.dtype | None, flip: bool = False) -> list[dict]:
    """Loss, top-1 and top-5 of each model over this rank's share of `loader`, summed over all ranks: exact
    counts, no padded duplicates. Several models share one pass over the data, so decoding is paid once.
    flip=True averages the logits of each image and its mirror image."""
    device = normalize.device
    modes = [m.training for m in models]
    for model in models:
        model.eval()
    sums = torch.zeros(len(models), 5, dtype=torch.float64, device=device)
    for images, labels, skipped in loader:
        x = normalize(images)  # first: decoding on the device may blank images and relabel them -1
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


class Trainer:
    def __init__(self, cfg: Config, classes: list[str]):
        self.cfg, self.classes = cfg, classes
        device = RT.device
        self.precision = resolve_precision(cfg.precision, device)
        self.amp_dtype = AMP_DTYPES[self.precision]
        torch.manual_seed(cfg.seed)
        self.model = ARCHITECTURES[cfg.arch](num_classes=len(classes)).to(device)
        if device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = True
        self.optimizer = torch.optim.SGD(parameter_groups(self.model, cfg.weight_decay, cfg.bias_decay), lr=cfg.lr,
                                         momentum=cfg.momentum)
        self.ema = WeightAverage(self.model, cfg.ema_decay) if cfg.ema_decay else None
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        # self.model stays the bare module: it is what gets saved and evaluated.
        self.step_model = self.model
        if RT.world_size > 1:
            self.step_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
        if cfg.compile:
            self.step_model = torch.compile(self.step_model)

        root = Path(cfg.data_dir)
        cores = max(1, usable_cores() // RT.local_world_size)
        workers = cfg.workers if cfg.workers >= 0 else 1 if device.type == "cpu" else max(1, cores - 1)
        if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            # Compute threads spin while they wait for each other; sharing cores with loader workers or
            # other ranks makes them over ten times slower (measured on 2 cores), so give each its own.
            torch.set_num_threads(max(1, cores - workers))
        dataset, collate_fn, pin, self.normalize = input_pipeline(cfg.decode, device, cfg.gpu_decode_share)
        self.train_set = dataset(root / "train", classes, True, cfg.image_size, cfg.seed, cfg.min_crop_scale,
                                 cfg.start_image_size, cfg.epochs)
        val_set = dataset(root / "val", classes, False, cfg.eval_image_size or cfg.image_size, cfg.seed)
        self.sampler = TrainBatchSampler(len(self.train_set), cfg.batch_size, RT.rank, RT.world_size, cfg.seed)
        if self.sampler.steps_per_epoch() == 0:
            raise UsageError(f"The training set has {len(self.train_set)} images, fewer than one global batch "
                             f"({cfg.batch_size} x {RT.world_size} processes); lower --batch-size.")
        self.train_loader = make_loader(self.train_set, self.sampler, workers, pin, worker_signal_handling, collate_fn)
        self.val_loader = make_loader(val_set, ValBatchSampler(len(val_set), cfg.batch_size, RT.rank, RT.world_size),
                                      workers, pin, worker_signal_handling, collate_fn)
        self.val_images = len(val_set)
        self.criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.stop = StopRequest()
        self.history: list[dict] = []
        self.epoch, self.samples_done = 0, 0
        self.carried = torch.zeros(5, dtype=torch.float64)  # epoch sums from before a mid-epoch resume
        self.carried_seconds = 0.0

    @property
    def total_steps(self) -> int:
        return self.cfg.epochs * self.sampler.steps_per_epoch()

    def global_step(self) -> int:
        return self.epoch * self.sampler.steps_per_epoch() + self.samples_done // self.sampler.global_batch

    @property
    def peak_lr(self) -> float:
        return peak_lr(self.cfg.lr, self.cfg.lr_reference_batch, self.sampler.global_batch)

    def lr_at(self, step: int) -> float:
        c = self.cfg
        warmup_steps = round(c.warmup_epochs * self.sampler.steps_per_epoch())
        return learning_rate(c.schedule, step, self.total_steps, warmup_steps, self.peak_lr, c.pct_start,
                             c.div_factor, c.final_div_factor)

    # -------------------------------------------------------------------------------- checkpoints

    def state(self, epoch_sums: torch.Tensor, seconds: float) -> dict:
        return {
            "model": self.model.state_dict(),  # the bare module: no "module." or "_orig_mod." prefixes
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {"kind": self.cfg.schedule, "global_step": self.global_step()},
            "ema": self.ema.model.state_dict() if self.ema else None,
            "grad_scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "samples_done": self.samples_done,
            # Train-metric sums of the unfinished epoch: loss, top-1, top-5, images, skipped images.
            "epoch_sums": epoch_sums.tolist(),
            "epoch_seconds": seconds,
            "history": self.history,
            "config": asdict(self.cfg),
            "class_names": self.classes,
            "world_size": RT.world_size,
            "torch_version": str(torch.__version__),  # TorchVersion would not load with weights_only
        }

    def save(self, epoch_sums: torch.Tensor, seconds: float) -> None:
        if RT.master:
            try:
                save_checkpoint(self.state(epoch_sums, seconds), Path(self.cfg.output_dir))
            except OSError as err:
                if not Path(self.cfg.output_dir).is_dir():
                    raise UsageError(f"The output folder {self.cfg.output_dir} disappeared during training (moved, "
                                     f"deleted or unmounted), so nothing more was written. Put it back and rerun "
                                     f"the same command to continue from its last checkpoint.") from err
                raise UsageError(f"Could not save a checkpoint in {self.cfg.output_dir}: {err}. The previous "
                                 f"checkpoints there are intact; free some space or fix the folder's permissions, "
                                 f"then rerun the same command to continue from them.") from err

    def resume(self, state: dict) -> None:
        saved = state["config"]
        if state["class_names"] != self.classes:
            raise UsageError(f"The checkpoint in {self.cfg.output_dir} was trained on {len(state['class_names'])} "
                             f"other classes than the {len(self.classes)} in {self.cfg.data_dir}. Use another "
                             f"--output-dir for this dataset, or --no-resume to start over here.")
        if saved["arch"] != self.cfg.arch:
            raise UsageError(f"The checkpoint in {self.cfg.output_dir} is a {saved['arch']}, not a {self.cfg.arch}. "
                             f"Pass --arch {saved['arch']} to continue it, or --no-resume to start over.")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["grad_scaler"])
        self.epoch, self.samples_done, self.history = state["epoch"], state["samples_done"], state["history"]
        self.carried = torch.tensor(state["epoch_sums"], dtype=torch.float64)
        self.carried_seconds = state["epoch_seconds"]
        # The command line wins over the saved hyperparameters.
        fresh = parameter_groups(self.model, self.cfg.weight_decay, self.cfg.bias_decay)
        for group, new in zip(self.optimizer.param_groups, fresh, strict=True):
            group.update(momentum=self.cfg.momentum, weight_decay=new["weight_decay"])
        if self.ema and state.get("ema"):
            self.ema.model.load_state_dict(state["ema"])
        if self.epoch >= self.cfg.epochs:
            return  # finished; run() says so
        log(f"Resuming {self.cfg.output_dir}: epoch {self.epoch + 1}, "
            f"{self.samples_done:,}/{len(self.train_set):,} images of it done.")
        changed = {k: (saved.get(k), v) for k, v in asdict(self.cfg).items()
                   if k not in ("no_resume", "demo") and saved.get(k) != v}
        if state["world_size"] != RT.world_size:
            changed["processes"] = (state["world_size"], RT.world_size)
        for key, (old, new) in changed.items():
            log(f"  {key}: {old} -> {new}; the new value applies from here on.")
        if changed.keys() & {"epochs", "lr", "lr_reference_batch", "schedule", "pct_start", "warmup_epochs",
                             "div_factor", "final_div_factor", "batch_size", "processes"}:
            log(f"  The LR schedule is recomputed for {self.cfg.epochs} epochs; the LR now is "
                f"{self.lr_at(self.global_step()):.4g}.")
        if changed.keys() & {"batch_size", "processes"} and self.samples_done:
            log("  The position in the epoch is kept in images, so no image of this epoch is repeated or skipped.")
        if "seed" in changed:
            log("  A new seed reshuffles the rest of this epoch too: some of its images repeat, some are skipped.")
        if self.ema and not state.get("ema"):
            self.ema = WeightAverage(self.model, self.cfg.ema_decay)
            log("  The weight average starts from the current weights.")

    # -------------------------------------------------------------------------------- loops

    def train_epoch(self) -> str:
        """One epoch from self.samples_done on. Returns "done", or "stop" after saving for a stop request."""
        cfg, device = self.cfg, RT.device
        self.sampler.set_epoch(self.epoch, self.samples_done)
        self.model.train()
        sums = torch.zeros(5, dtype=torch.float64, device=device)  # this process's share since the resume
        steps = len(self.sampler)
        bar = tqdm(total=self.sampler.steps_per_epoch(), initial=self.sampler.steps_per_epoch() - steps,
                   desc=f"epoch {self.epoch + 1}/{cfg.epochs} {self.train_set.image_size_at(self.epoch)}px",
                   disable=not RT.master, dynamic_ncols=True,
                   unit="step", file=sys.stdout)
        started = last_sync = time.perf_counter()
        last_save, synced_steps = time.monotonic(), 0
        waiting = LoaderWait(self.train_loader)
        for i, (images, labels, skipped) in enumerate(waiting):
            x = self.normalize(images)  # first: decoding on the device may replace images, labels and skipped
            labels = labels.to(device, non_blocking=True)
            for line in skipped:
                log(f"Skipped an unreadable training image: {line}")
            lr = self.lr_at(self.global_step())
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast(device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                logits = self.step_model(x)
                loss = self.criterion(logits, labels)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.ema:
                self.ema.update(self.global_step())
            top1, top5 = accuracy_counts(logits.detach(), labels)
            sums += torch.stack([loss.detach().double() * len(labels), top1.double(), top5.double(),
                                 torch.tensor(float(len(labels)), device=device),
                                 torch.tensor(float(len(skipped)), device=device)])
            self.samples_done += self.sampler.global_batch

            last = i == steps - 1
            if (i + 1) % cfg.log_every and not last:
                continue
            # The host sync point: one all-reduce carries the metrics and every rank's votes, so all ranks
            # take the same decisions at the same step.
            due = RT.master and time.monotonic() - last_save >= cfg.checkpoint_minutes * 60
            votes = torch.tensor([self.stop.signal_name is not None, due], dtype=torch.float64, device=device)
            packet = all_reduce(torch.cat([sums, votes])).cpu()
            epoch_sums = self.carried + packet[:5]
            if not math.isfinite(epoch_sums[0]):
                raise NonFiniteLoss(f"The training loss became non-finite in epoch {self.epoch + 1} at step "
                                    f"{self.global_step()}. The last good checkpoint in {cfg.output_dir} is "
                                    f"untouched. Try a lower --lr, or --precision bf16/fp32 instead of fp16.")
            now = time.perf_counter()
            seen = epoch_sums[3].item()
            bar.update(i + 1 - synced_steps)
            images_per_second = (i + 1 - synced_steps) * self.sampler.global_batch / (now - last_sync)
            synced_steps, last_sync = i + 1, now
            seconds = self.carried_seconds + now - started
            money = {"usd": f"{self.cfg.usd_per_hour * (self.seconds_spent() + seconds) / 3600:.2f}"
                     } if self.cfg.usd_per_hour else {}
            bar.set_postfix(loss=f"{epoch_sums[0].item() / seen:.3f}", top1=f"{100 * epoch_sums[1].item() / seen:.1f}%",
                            lr=f"{lr:.3g}", img_s=f"{images_per_second:.0f}",
                            data_wait=f"{100 * waiting.seconds / (now - started):.0f}%", **money)
            if packet[5] > 0 or packet[6] > 0:
                self.save(epoch_sums, seconds)
                last_save = time.monotonic()
                if packet[5] > 0:
                    bar.close()
                    return "stop"
        bar.close()
        self.epoch_sums = self.carried + all_reduce(sums).cpu() if steps == 0 else epoch_sums
        self.epoch_seconds = self.carried_seconds + time.perf_counter() - started
        # This process's share of the time since the epoch began or resumed: a resume does not save it.
        self.data_wait_fraction = waiting.seconds / max(time.perf_counter() - started, 1e-9)
        return "done"

    def evaluate(self) -> dict:
        models = [self.model] + ([self.ema.model] if self.ema else [])
        if RT.world_size > 1:  # BN statistics drift apart per rank; evaluate and save rank 0's everywhere
            for buffer in (b for m in models for b in m.buffers()):
                dist.broadcast(buffer, 0)
        metrics, *ema = evaluate(models, self.val_loader, self.normalize, self.amp_dtype, self.cfg.eval_flip)
        for averaged in ema:
            metrics.update({f"ema_{k}": averaged[k] for k in ("val_loss", "val_acc1", "val_acc5")})
        return metrics

    def check_ranks_agree(self) -> None:
        """DDP keeps replicas identical by construction; verify it once per epoch, it costs one all-gather."""
        if RT.world_size == 1:
            return
        fingerprint = torch.stack([t.detach().double().sum() for t in self.model.state_dict().values()
                                   if t.is_floating_point()]).sum()
        gathered = [torch.zeros_like(fingerprint) for _ in range(RT.world_size)]
        dist.all_gather(gathered, fingerprint)
        if any(g != gathered[0] for g in gathered):
            raise RuntimeError(f"Model replicas differ across ranks after epoch {self.epoch + 1}: "
                               f"{[g.item() for g in gathered]}")
        log(f"Weights identical on all {RT.world_size} ranks (fingerprint {fingerprint.item():.12g}).")

    def seconds_spent(self) -> float:
        """Training plus validation time of the finished epochs."""
        return sum(r["epoch_seconds"] + r.get("val_seconds", 0.0) for r in self.history)

    def time_and_cost(self, last: dict) -> str:
        """Time spent and to go (training plus validation, projected from the last epoch), and what that
        costs at --usd-per-hour."""
        spent = self.seconds_spent()
        to_go = (self.cfg.epochs - self.epoch) * (last["epoch_seconds"] + last["val_seconds"])
        text = f"{format_duration(spent)} so far, about {format_duration(to_go)} to go"
        if self.cfg.usd_per_hour:
            text += (f", ${self.cfg.usd_per_hour * spent / 3600:,.2f} spent, about "
                     f"${self.cfg.usd_per_hour * (spent + to_go) / 3600:,.2f} for the run (projected)")
        return text

    def fit(self) -> int:
        cfg = self.cfg
        out = Path(cfg.output_dir)
        log(f"Training {cfg.arch} on {RT.world_size} x {RT.device.type} ({self.precision}), "
            f"{cfg.batch_size} images per process per step, {self.sampler.steps_per_epoch()} steps per epoch, "
            f"recipe {cfg.recipe}: {cfg.schedule} schedule to peak LR {self.peak_lr:.4g}, {cfg.epochs} epochs. "
            f"Outputs: {out}")
        while self.epoch < cfg.epochs:
            if self.train_epoch() == "stop":
                log(f"Stopped by {self.stop.signal_name}; checkpoint saved at epoch {self.epoch + 1}, "
                    f"{self.samples_done:,} images into it. Rerun the same command to continue.")
                return 0
            val_started = time.perf_counter()
            val = self.evaluate()
            val_seconds = time.perf_counter() - val_started
            self.check_ranks_agree()
            loss, top1, top5, images, skipped = self.epoch_sums.tolist()
            skipped += val.pop("val_skipped")
            row = {"epoch": self.epoch + 1, "lr": self.lr_at(self.global_step() - 1), "train_loss": loss / images,
                   "train_acc1": 100 * top1 / images, "train_acc5": 100 * top5 / images, **val,
                   "epoch_seconds": self.epoch_seconds, "images_per_second": images / self.epoch_seconds,
                   "train_images": int(images), "skipped_images": int(skipped),
                   "image_size": self.train_set.image_size_at(self.epoch), "val_seconds": val_seconds,
                   "data_wait_pct": 100 * self.data_wait_fraction}
            self.history.append(row)
            self.epoch, self.samples_done = self.epoch + 1, 0
            self.carried, self.carried_seconds = torch.zeros(5, dtype=torch.float64), 0.0
            self.save(self.carried, 0.0)
            if RT.master:
                try:
                    append_metrics(out / "metrics.csv", [row])
                    plot_history(self.history, out / "training_curves.png")
                except OSError as err:
                    raise UsageError(f"Could not write metrics.csv or the plot in {out}: {err}. Epoch {row['epoch']} "
                                     f"is in the checkpoint; free some space or fix the folder, then rerun the same "
                                     f"command: it writes the missing row and continues.") from err
            log(f"epoch {row['epoch']}/{cfg.epochs}: train loss {row['train_loss']:.4f} top-1 "
                f"{row['train_acc1']:.2f}% | val loss {row['val_loss']:.4f} top-1 {row['val_acc1']:.2f}% "
                f"top-5 {row['val_acc5']:.2f}% on {row['val_images']:,} images"
                + (f" (weight average: top-1 {row['ema_val_acc1']:.2f}%)" if self.ema else "")
                + f" | {row['epoch_seconds']:.0f} s, {row['images_per_second']:.0f} img/s, waiting for data "
                f"{row['data_wait_pct']:.0f}% of the time"
                + data_wait_advice(self.data_wait_fraction, cfg.decode, cfg.gpu_decode_share, RT.device.type,
                                   self.train_loader.num_workers)
                + f" | {self.time_and_cost(row)}"
                + (f" | {row['skipped_images']} unreadable images skipped" if row["skipped_images"] else ""))
            stop_votes = all_reduce(torch.tensor([float(self.stop.signal_name is not None)], device=RT.device))
            if stop_votes.item() > 0 and self.epoch < cfg.epochs:
                log(f"Stopped by a signal after epoch {self.epoch}; rerun the same command to continue.")
                return 0
        log(f"Training finished: {cfg.epochs} epochs, final val top-1 {self.history[-1]['val_acc1']:.2f}%. "
            f"Outputs in {out}.")
        return 0


class NonFiniteLoss(Exception):
    pass


# ---------------------------------------------------------------------------------------------------- main

def launch_one_process_per_gpu(argv: list[str]) -> int:
    """`python train.py` on a multi-GPU box: become torchrun with one process per GPU. --standalone lets
    torch.distributed pick a free port, so two jobs on one box never collide."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(["--standalone", f"--nproc_per_node={torch.cuda.device_count()}", __file__, *argv])
    except SignalException as err:
        print(f"Launcher received signal {err.sigval}; the workers saved a checkpoint on their way out. "
              f"Rerun the same command to continue.")
    except ChildFailedError as err:
        print(f"A training process failed; see its error above. {err}", file=sys.stderr)
        return 1
    return 0


def prepare(cfg: Config) -> list[str]:
    """Everything that can fail because of the user's input, before any process group or GPU work."""
    if cfg.demo and Path(cfg.data_dir) == DEMO_DATA_DIR:
        make_demo_dataset(DEMO_DATA_DIR)
    layout = check_layout(cfg.data_dir)
    if "RANK" not in os.environ or os.environ["RANK"] == "0":
        print(f"Data: {layout.summary()}")
    return layout.classes


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg, explicit = parse_args(argv)
    try:
        classes = prepare(cfg)
        device_type = resolve_device(cfg.device)
        if device_type == "cuda" and "RANK" not in os.environ and torch.cuda.device_count() > 1:
            return launch_one_process_per_gpu(argv)
        global RT
        RT = setup_distributed(device_type)
        return run(cfg, classes, explicit)
    except (DatasetLayoutError, UsageError, CheckpointError) as err:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except DataVanishedError:
        if os.environ.get("RANK", "0") == "0":
            # Not str(err): re-raised from a loader worker, it holds that worker's whole traceback.
            print(f"error: the training data in {cfg.data_dir} disappeared during training (a class folder is "
                  f"gone: moved, deleted or unmounted). The checkpoints in {cfg.output_dir} are intact: restore "
                  f"or remount the data and rerun the same command to continue from them.", file=sys.stderr)
        return EXIT_BAD_INPUT
    except NonFiniteLoss as err:
        log(f"error: {err}")
        return EXIT_NON_FINITE
    finally:
        # An error re-raised from a loader worker sits in a reference cycle with the loader's iterator, which
        # only the cyclic GC frees. Free it now so the iterator shuts its workers down: left to the exit
        # handlers, a worker gets a plain SIGTERM and waits out its WORKER_GRACE_SECONDS reprieve.
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()


def run(cfg: Config, classes: list[str], explicit: set[str] = frozenset()) -> int:
    out = Path(cfg.output_dir)
    state, error = None, None
    if RT.master:
        try:
            out.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(out)
            if cfg.no_resume:
                move_run_aside(out)
            else:
                state = load_latest_checkpoint(out, log)
        except (CheckpointError, OSError) as err:
            error = err
    if RT.world_size > 1:
        # Only rank 0 reads the checkpoint: other nodes need no shared filesystem, and one copy is read once.
        shared = [state, error]
        dist.broadcast_object_list(shared, src=0)
        state, error = shared
    if error is not None:
        raise error if isinstance(error, CheckpointError) else UsageError(f"Cannot use {out}: {error}")
    if state is not None:
        cfg = resumed_config(cfg, state["config"], explicit)
    trainer = Trainer(cfg, classes)
    if state is not None:
        trainer.resume(state)
        if RT.master:
            append_metrics(out / "metrics.csv", trainer.history)  # rows a kill kept out of the file
        if trainer.epoch >= cfg.epochs:
            last = trainer.history[-1]["val_acc1"] if trainer.history else float("nan")
            log(f"This run is already finished ({trainer.epoch} of {cfg.epochs} epochs, val top-1 {last:.2f}%). "
                f"Outputs are in {out}. Pass a larger --epochs to train on, or --no-resume to start over.")
            return 0
    return trainer.fit()


if __name__ == "__main__":
    sys.exit(main())
