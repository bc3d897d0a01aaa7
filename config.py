"""A run's settings: the Config dataclass (one flag per field), the presets behind --recipe and --demo, the
checks that refuse settings that cannot work, and how a resumed run merges the settings it was started with.

Precedence: Config's defaults < the recipe < --demo's settings < flags given on the command line.
"""

import argparse
import math
from dataclasses import asdict, dataclass, field, fields, replace

from dataset_paths import (  # UsageError lives there so that the loader (data.py) can raise it without this module
    DEFAULT_DATA_DIR,
    DEFAULT_OUTPUT_DIR,
    DEMO_DATA_DIR,
    DEMO_OUTPUT_DIR,
    UsageError,
    default_output_dir,
)
from model import ARCHITECTURES, MIN_IMAGE_SIZE
from recipes import INSTANCE_PRICES, LAYERWISE_OPTIMIZERS, OPTIMIZER_DEFAULTS, RECIPES, SCHEDULES

EXIT_BAD_INPUT = 2  # the user can fix it: a data layout, a flag, a checkpoint
EXIT_NON_FINITE = 3  # training diverged; the last good checkpoint is kept


def setting(default, help, **argparse_kwargs):
    return field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclass
class Config:
    data_dir: str = setting(str(DEFAULT_DATA_DIR), "dataset root holding train/<class>/ and val/<class>/")
    output_dir: str = setting(str(DEFAULT_OUTPUT_DIR), "checkpoints, metrics.csv and the plot; resumes from here. "
                                                       "Default: runs/resnet50 on the data's volume when it is a "
                                                       "mounted one (it outlives a spot instance), else beside "
                                                       "the code")
    recipe: str = setting("seed", "preset of the settings below (explicit flags still win): seed = the original "
                                  "50-epoch one-cycle run; fast = fewer epochs at lower resolution; lars = large "
                                  "batches on 8+ GPUs after MLPerf's ResNet-50 (see recipes.py)",
                          choices=list(RECIPES))
    arch: str = setting("resnet50", "network; the small ones are for quick CPU runs", choices=list(ARCHITECTURES))
    # The optimizer's state is part of the run: a checkpoint resumes only with the optimizer that wrote it.
    optimizer: str = setting("sgd", "sgd (momentum), lars or lamb (layer-wise trust ratio, timm's; need `pip install "
                                    "timm`), adamw (decoupled weight decay). Another optimizer than the recipe's "
                                    "brings its published peak LR, reference batch and weight decay (recipes.py)",
                             choices=list(OPTIMIZER_DEFAULTS))
    epochs: int = setting(50, "passes over the training set")
    batch_size: int = setting(256, "images per GPU (per process) and step")
    lr: float = setting(0.175, "peak learning rate per --lr-reference-batch images of global batch (the recipes "
                               "set 256: on N GPUs x 256 the peak is N x --lr); with --lr-reference-batch 0, "
                               "the peak itself")
    lr_reference_batch: int = setting(0, "scale --lr by global batch / this many images; 0: use --lr as is")
    lr_scaling: str = setting("linear", "how --lr follows global batch / --lr-reference-batch: linear (SGD, Goyal et "
                                        "al.) or sqrt (the square root: LARS, LAMB, AdamW)", choices=["linear", "sqrt"])
    schedule: str = setting("onecycle", "LR schedule: onecycle (cosine up and down), linear, cosine or poly "
                                        "(power 2) after a linear warm-up, step (/10 at 1/3, 2/3 and 8/9 of the "
                                        "run)",
                            choices=list(SCHEDULES))
    pct_start: float = setting(0.3, "onecycle: fraction of training spent raising the LR to its peak")
    warmup_epochs: float = setting(0.0, "linear, cosine, step, poly: epochs of linear warm-up to the peak LR")
    div_factor: float = setting(25.0, "the LR starts at lr / div_factor")
    final_div_factor: float = setting(1e4, "onecycle, linear, cosine, poly: the LR ends at lr / div_factor / this")
    momentum: float = setting(0.9, "SGD and LARS momentum, LAMB and AdamW beta1 (held constant, not cycled)")
    weight_decay: float = setting(1e-4, "L2 penalty on conv and fc weights (and on 1-D parameters with --bias-decay)")
    bias_decay: bool = setting(True, "also decay biases and BatchNorm parameters (every 1-D parameter, chosen by "
                                     "shape); --no-bias-decay exempts them (always so under lars and lamb)",
                               action=argparse.BooleanOptionalAction)
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
    threads: int = setting(0, "CPU runs: torch's compute threads per process; 0: measured when a run starts (all "
                              "cores when the step takes over twice as long as the loader per batch, else the "
                              "cores the workers leave) and kept for the run, so a resume computes bit for bit "
                              "alike")
    decode: str = setting("auto", "where JPEGs are decoded: cpu = in the loader workers; gpu = workers only read the "
                                  "files, batches are decoded, cropped and resized on the GPU (nvJPEG on the CUDA "
                                  "cores); dali = the same with NVIDIA DALI, on the GPU's hardware JPEG decoder where "
                                  "it has one (pip install -r requirements-dali.txt); auto = dali on a GPU with DALI "
                                  "installed, else cpu. gpu and dali fall back to cpu without a GPU",
                          choices=["auto", "cpu", "gpu", "dali"])
    gpu_decode_share: float = setting(1.0, "with --decode gpu or dali: the fraction of the JPEGs decoded on the GPU, "
                                           "the rest by the workers; lower it when training waits for the GPU "
                                           "decoder, raise it when it waits for the workers (benchmark.py train "
                                           "--decode gpu --gpu-decode-share 0,0.25,0.5,1 finds the best)")
    device: str = setting("auto", "cuda if available, else cpu", choices=["auto", "cuda", "cpu"])
    precision: str = setting("auto", "auto: bf16 where the GPU supports it, else fp16 with loss scaling; fp32 on CPU",
                             choices=["auto", "bf16", "fp16", "fp32"])
    compile: bool = setting(False, "torch.compile the model: one static graph per image size, compiled at its "
                                   "first step (slower start, faster steps)")
    compile_backend: str = setting("inductor", "with --compile: torch.compile's backend. inductor generates the fast "
                                               "kernels; aot_eager and eager only capture the graph (aot_eager "
                                               "also traces autograd; under DDP both split it per gradient bucket) "
                                               "and run it with eager kernels: seconds to compile, for telling "
                                               "which stage a compile problem is in")
    seed: int = setting(0, "decides initial weights, data order and every augmentation")
    checkpoint_minutes: float = setting(10.0, "also save mid-epoch this often (a checkpoint is always saved per epoch)")
    log_every: int = setting(10, "steps between host syncs: progress bar, stop requests, periodic saves, NaN check")
    usd_per_hour: float = setting(0.0, "what the machine costs per hour; the progress bar and epoch summary then "
                                       "show the money spent and a projection for the whole run")
    tensorboard: bool = setting(True, "write loss, top-1, LR, img/s, the data wait and val metrics to "
                                      "OUTPUT_DIR/tensorboard at every sync point and epoch",
                                action=argparse.BooleanOptionalAction)
    instance_type: str = setting("", "take --usd-per-hour from recipes.INSTANCE_PRICES (dated list prices)",
                                 choices=["", *INSTANCE_PRICES])
    sync_check_steps: int = setting(0, "a check for developers (benchmark.py gpu-check runs it): train this many "
                                       "steps, on to the next sync point, with torch.cuda.set_sync_debug_mode"
                                       "(\"warn\") on in the step loop between its sync points, write each place "
                                       "there where the host waited for the GPU, and the steps that ran, to "
                                       "OUTPUT_DIR/sync_check.json, and stop without saving; 0: off")
    # Where the run's weights came from; a rerun of the same command resumes the run, never re-initializes it.
    init_from: str = setting("", "start a new run from the weights of this train.py checkpoint, with a fresh "
                                 "optimizer, schedule and epoch count (fine-tuning; or another --optimizer for a "
                                 "trained network); the network and the number of classes must match; a prune.py "
                                 "file fine-tunes its narrower network")
    no_resume: bool = setting(False, "start a new run; an existing one in --output-dir is moved to a subfolder")
    demo: bool = setting(False, "train on the bundled digits dataset (small network, 32 px) instead of ImageNet")


# What --demo changes unless the flag is given explicitly: a run that learns on a 2-core CPU in about a minute.
# It also switches off a recipe's ImageNet resolutions and LR scaling, which mean nothing for 32 px digits.
DEMO_SETTINGS = dict(data_dir=str(DEMO_DATA_DIR), output_dir=str(DEMO_OUTPUT_DIR), arch="resnet26_narrow",
                     epochs=12, batch_size=64, lr=0.2, lr_reference_batch=0, image_size=32, start_image_size=0,
                     eval_image_size=0, min_crop_scale=0.35)

# The demo's peak LR for each optimizer at its batch of 64, without scaling: the published ones belong to ImageNet
# batches of thousands. Each was checked by training the demo (README, Optimizers).
DEMO_LRS = {"sgd": 0.2, "lars": 1.0, "lamb": 0.03, "adamw": 0.003}

# Settings of this machine or this invocation rather than of the run: a resume takes them from the command
# line or their defaults, never from the checkpoint.
SESSION_SETTINGS = {"data_dir", "output_dir", "workers", "decode", "gpu_decode_share", "device", "compile",
                    "compile_backend", "checkpoint_minutes", "log_every", "usd_per_hour", "instance_type", "no_resume",
                    "demo", "tensorboard", "sync_check_steps"}


def add_config_argument(parser: argparse.ArgumentParser, f) -> None:
    """One Config field as a command-line flag, its help and choices taken from the field."""
    flag = "--" + f.name.replace("_", "-")
    kwargs = {k: v for k, v in f.metadata.items() if k != "help"}
    if f.type is bool:
        parser.add_argument(flag, action=kwargs.get("action", "store_true"), help=f.metadata["help"])
    else:
        parser.add_argument(flag, type=f.type, help=f.metadata["help"] + f" (default: {f.default})", **kwargs)


def config_from_flags(explicit: dict) -> Config:
    """The presets (--recipe, then --demo) under the flags that were given. A --data-dir without --output-dir
    puts the run on that data's volume, as the default data root's run is on its volume. A recipe's LR and
    weight decay are tuned for its own optimizer: another --optimizer brings its own."""
    recipe = RECIPES[explicit.get("recipe", "seed")]
    optimizer = explicit.get("optimizer", recipe.get("optimizer", "sgd"))
    if optimizer != recipe.get("optimizer", "sgd"):
        recipe = {**recipe, **OPTIMIZER_DEFAULTS[optimizer]}
    demo = {**DEMO_SETTINGS, "lr": DEMO_LRS[optimizer]} if explicit.get("demo") else {}
    cfg = Config(**{**recipe, **demo, **explicit})
    if "data_dir" in explicit and "output_dir" not in explicit and not cfg.demo:
        cfg.output_dir = str(default_output_dir(cfg.data_dir))
    return cfg


def parse_args(argv: list[str] | None = None) -> tuple[Config, set[str]]:
    """The settings, and the names of those given on the command line (they override a resumed run's)."""
    # SUPPRESS keeps unset flags out of the namespace, so presets can tell their values from explicit flags.
    parser = argparse.ArgumentParser(description="Train ResNet-50 on ImageNet-1K (or any ImageNet-style folder) "
                                                 "with DDP, mixed precision and exact, automatic resume.",
                                     argument_default=argparse.SUPPRESS)
    for f in fields(Config):
        add_config_argument(parser, f)
    explicit = vars(parser.parse_args(argv))
    cfg = config_from_flags(explicit)
    if cfg.instance_type and "usd_per_hour" not in explicit:
        cfg.usd_per_hour = INSTANCE_PRICES[cfg.instance_type][0]
    problems = config_problems(cfg)
    if problems:
        parser.error("; ".join(problems))
    return cfg, set(explicit)


def parse_config(argv: list[str] | None = None) -> Config:
    return parse_args(argv)[0]


def config_problems(cfg: Config) -> list[str]:
    """Every setting that cannot work, found before anything is built or trained."""
    problems = [f"--{name.replace('_', '-')} must be a finite number, not {value}"
                for name, value in asdict(cfg).items() if isinstance(value, float) and not math.isfinite(value)]
    problems += [f"--{name.replace('_', '-')} must be positive" for name in
                 ("epochs", "batch_size", "lr", "image_size", "log_every", "checkpoint_minutes")
                 if getattr(cfg, name) <= 0]
    if 0 < cfg.image_size < MIN_IMAGE_SIZE or 0 < cfg.eval_image_size < MIN_IMAGE_SIZE:
        problems.append(f"--image-size and --eval-image-size must be at least {MIN_IMAGE_SIZE} pixels, the networks' "
                        f"total downsampling ({cfg.image_size} and {cfg.eval_image_size} given)")
    if cfg.threads < 0:
        problems.append(f"--threads must be 0 (measured) or more, not {cfg.threads}")
    if cfg.sync_check_steps < 0:
        problems.append(f"--sync-check-steps must be 0 (off) or more, not {cfg.sync_check_steps}")
    if cfg.workers < -1:
        problems.append(f"--workers must be -1 (one per free core) or 0 and up, not {cfg.workers}")
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
    if cfg.compile:
        import torch._dynamo  # only runs that compile pay for its import (about a second)

        if cfg.compile_backend not in torch._dynamo.list_backends(exclude_tags=()):
            problems.append(f"--compile-backend must name a torch.compile backend (inductor, aot_eager or eager; "
                            f"torch._dynamo.list_backends(exclude_tags=()) lists them all), not "
                            f"{cfg.compile_backend!r}")
    elif cfg.compile_backend != Config.compile_backend:
        problems.append(f"--compile-backend {cfg.compile_backend} takes effect only with --compile")
    if cfg.optimizer in LAYERWISE_OPTIMIZERS and cfg.bias_decay:
        problems.append(f"--bias-decay does not apply to --optimizer {cfg.optimizer}: it never decays BatchNorm "
                        f"parameters and biases nor rescales their steps, as the published recipes do")
    return problems


def resumed_config(cfg: Config, saved: dict, explicit: set[str]) -> Config:
    """A resumed run keeps the settings it was started with, so a bare `python train.py` continues a
    `--recipe fast --epochs 40` run as it was; flags given now override them (train.resume announces each).
    A new --recipe brings its own presets and the defaults back for what the old recipe had set."""
    if "recipe" in explicit:
        explicit = explicit | RECIPES[cfg.recipe].keys() | RECIPES.get(saved.get("recipe"), {}).keys()
    names = {f.name for f in fields(Config)} - SESSION_SETTINGS - explicit
    merged = replace(cfg, **{k: v for k, v in saved.items() if k in names})
    if merged.init_from != saved.get("init_from", ""):
        raise UsageError(f"{cfg.output_dir} holds a run started from {saved.get('init_from') or 'random weights'}; "
                         f"--init-from {merged.init_from or '(none)'} starts a new run, which would not continue it. "
                         f"Pass another --output-dir for the new run, or --no-resume to start it here (the old run "
                         f"is moved to a subfolder).")
    started_with = saved.get("optimizer", "sgd")  # checkpoints from before --optimizer are SGD runs
    if merged.optimizer != started_with:
        raise UsageError(f"The run in {cfg.output_dir} was trained with --optimizer {started_with}, not "
                         f"{merged.optimizer}. An optimizer's state (momentum, moment estimates) means nothing to "
                         f"another one, so the run cannot continue with it. To train on from its weights with "
                         f"{merged.optimizer}, start a new run from them: --init-from "
                         f"{cfg.output_dir}/checkpoint.pth with another --output-dir; or pass --no-resume to "
                         f"start over here (the old run is moved to a subfolder).")
    problems = config_problems(merged)
    if problems:
        raise UsageError(f"The flags given now do not fit the run in {cfg.output_dir}: " + "; ".join(problems))
    return merged
