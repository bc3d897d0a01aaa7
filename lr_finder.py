"""LR range test: train a throwaway copy of train.py's model for a few hundred steps while the learning rate
rises exponentially, and read a peak LR for the one-cycle schedule off the loss curve.

    python lr_finder.py --demo                                      # bundled digits, CPU, about a minute
    python lr_finder.py --start_lr=1e-4 --end_lr=10 --num_iter=300  # ImageNet at train.py's defaults

Model, data pipeline, augmentation and optimizer (--optimizer: the sweep steps the optimizer the run will use)
are train.py's own (train.Config), so the answer applies to `python train.py --lr ...` with the same flags. The
sweep's weights are discarded: it writes only its curve, JSON and plots to --output-dir and refuses a folder that
holds a training run.
"""

import argparse
import csv
import json
import math
import os
import sys
from dataclasses import asdict, fields, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from checkpoint import LATEST, PREVIOUS
from config import EXIT_BAD_INPUT, Config, UsageError, add_config_argument, config_from_flags
from data import make_demo_dataset
from dataset_paths import DEMO_DATA_DIR, DEMO_OUTPUT_DIR, REPO_DIR, DatasetLayoutError, check_layout
from engine import build_data, build_model, build_training, split_cores, train_step
from gpu_decode import model_batch
from recipes import peak_lr
from runtime import Runtime, resolve_device

DEFAULT_OUTPUT_DIR = REPO_DIR / "runs" / "lr_finder"
DEMO_SWEEP_OUTPUT_DIR = REPO_DIR / "runs" / "lr_finder_demo"
# train.py flags that change what the sweep measures; help texts and choices come from train.Config.
SHARED_SETTINGS = ("data_dir", "recipe", "optimizer", "arch", "batch_size", "image_size", "min_crop_scale", "momentum",
                   "weight_decay", "bias_decay", "label_smoothing", "workers", "decode", "gpu_decode_share", "device",
                   "precision", "seed")
# The curve must fall at least this far below its starting level to show where learning happens. The second
# bound is in standard deviations of the smoothed curve's noise: on demo sweeps too short to learn anything the
# lowest point lay 1-4.2 of them below the start by chance, on sweeps that learned 8.9-46.
MIN_RELATIVE_DROP = 0.05
MIN_DROP_IN_NOISE = 6.0
PLOT_RANGES = {"full": None, "high": (0.1, 10.0), "mid": (0.01, 1.0)}


class OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(EXIT_BAD_INPUT, f"error: {message} (see --help)\n")


def parse_args(argv: list[str] | None = None) -> tuple[Config, argparse.Namespace, dict]:
    """Returns train.py's settings for the sweep, the sweep's own settings, and the flags given explicitly."""
    parser = OneLineErrorParser(description=__doc__.split("\n\n")[0], argument_default=argparse.SUPPRESS)
    parser.add_argument("--start_lr", "--start-lr", type=float, help="first LR of the ramp (default: 1e-4)")
    parser.add_argument("--end_lr", "--end-lr", type=float, help="last LR of the ramp (default: 10)")
    parser.add_argument("--num_iter", "--num-iter", type=int, help="steps of the ramp (default: 300)")
    parser.add_argument("--output-dir", help=f"curve, JSON and plots (default: {DEFAULT_OUTPUT_DIR}, "
                                             f"{DEMO_SWEEP_OUTPUT_DIR} with --demo)")
    parser.add_argument("--smoothing", type=float, help="beta of the loss's exponential average (default: "
                                                        "1 - 20 / num_iter, at most 0.98)")
    parser.add_argument("--divergence", type=float, help="stop once the smoothed loss exceeds this multiple of "
                                                         "its minimum (default: 4)")
    parser.add_argument("--demo", action="store_true", help="sweep on the bundled digits dataset with train.py's "
                                                            "--demo network, image size and batch size")
    for f in fields(Config):
        if f.name in SHARED_SETTINGS:
            add_config_argument(parser, f)
    explicit = vars(parser.parse_args(argv))
    sweep = argparse.Namespace(start_lr=1e-4, end_lr=10.0, num_iter=300, divergence=4.0,
                               output_dir=str(DEMO_SWEEP_OUTPUT_DIR if explicit.get("demo") else DEFAULT_OUTPUT_DIR))
    for key in vars(sweep).keys() & explicit.keys():
        setattr(sweep, key, explicit[key])
    sweep.smoothing = explicit.get("smoothing", default_smoothing(sweep.num_iter))
    cfg = config_from_flags({k: v for k, v in explicit.items() if k in SHARED_SETTINGS or k == "demo"})
    problems = []
    if not 0 < sweep.start_lr < sweep.end_lr:
        problems.append(f"need 0 < --start_lr < --end_lr, got {sweep.start_lr:g} and {sweep.end_lr:g}")
    if sweep.num_iter < 2:
        problems.append(f"--num_iter must be at least 2, got {sweep.num_iter}")
    if not 0 <= sweep.smoothing < 1 or sweep.divergence <= 1:
        problems.append("--smoothing must be in [0, 1) and --divergence above 1")
    if cfg.batch_size <= 0 or cfg.image_size <= 0 or not 0 < cfg.min_crop_scale <= 1:
        problems.append("--batch-size and --image-size must be positive, --min-crop-scale in (0, 1]")
    if not 0 <= cfg.gpu_decode_share <= 1:
        problems.append("--gpu-decode-share must be in [0, 1]")
    if problems:
        parser.error("; ".join(problems))
    return cfg, sweep, explicit


# ---------------------------------------------------------------------------------------------------- the curve

def lr_ramp(start_lr: float, end_lr: float, num_iter: int) -> np.ndarray:
    """Equal ratios between steps: every decade of LR gets the same number of steps."""
    return start_lr * (end_lr / start_lr) ** (np.arange(num_iter) / (num_iter - 1))


def default_smoothing(num_iter: int) -> float:
    """An average over 1 / (1 - beta) steps lags about that many steps behind the loss. A twentieth of the sweep
    keeps the lag near a quarter decade of LR for a 5-decade ramp, whatever --num_iter; the customary fixed 0.98
    lags 50 steps, half of a 100-step sweep, and moves the minimum far to the right of where it really is."""
    return min(0.98, max(0.0, 1 - 20 / num_iter))


class SmoothedLoss:
    """Exponential moving average with the bias correction Adam uses: without it the first values are
    pulled towards zero and look like the lowest loss of the sweep."""

    def __init__(self, beta: float):
        self.beta, self.average, self.count = beta, 0.0, 0

    def __call__(self, loss: float) -> float:
        self.count += 1
        self.average = self.beta * self.average + (1 - self.beta) * loss
        return self.average / (1 - self.beta ** self.count)


def smooth(losses, beta: float) -> np.ndarray:
    smoother = SmoothedLoss(beta)
    return np.array([smoother(x) for x in losses])


def diverged(smoothed: float, best: float, factor: float) -> bool:
    return not math.isfinite(smoothed) or smoothed > factor * best


def smoothed_noise(losses, beta: float) -> float:
    """Standard deviation of the smoothed curve's batch-to-batch noise. Differences of neighbouring steps see the
    noise, not the trend; their median absolute deviation ignores the spikes of a high LR; the average shrinks
    white noise by sqrt((1 - beta) / (1 + beta))."""
    steps = np.diff(losses)
    if len(steps) == 0:
        return 0.0
    raw = 1.4826 * np.median(np.abs(steps - np.median(steps))) / math.sqrt(2)
    return float(raw * math.sqrt((1 - beta) / (1 + beta)))


def suggest(lrs, losses, smoothed, beta: float) -> dict:
    """Two readings of the curve, and warnings where it cannot support them.

    steepest_lr: where the smoothed loss falls fastest per decade of LR, before its minimum.
    min_loss_lr / 10: a decade below where the loss stops improving. This is `suggested_lr`: the minimum is a
    sharper feature of a noisy curve than its steepest slope, and one-cycle warms up to its peak, so the peak
    may sit well above the steepest point yet must stay clear of where training starts to blow up."""
    lrs, losses, smoothed = (np.asarray(x, dtype=float) for x in (lrs, losses, smoothed))
    finite = np.isfinite(smoothed)
    end = len(smoothed) if finite.all() else int(np.argmin(finite))
    # The first 1 / (1 - beta) smoothed values average only a few steps; they are neither a level nor a minimum.
    warmup = min(max(1, round(1 / (1 - beta))), end)
    result = {"suggested_lr": None, "steepest_lr": None, "min_loss_lr": None, "warnings": []}
    if end - warmup < 2:
        result["warnings"].append(f"uninformative curve: only {end} finite steps before the loss blew up; "
                                  f"lower --start_lr or raise --num_iter")
        return result
    start_level = losses[:max(warmup, 5)].mean()
    best = warmup - 1 + int(np.argmin(smoothed[warmup - 1:end]))
    result["min_loss_lr"] = float(lrs[best])
    noise = smoothed_noise(losses[:best + 1], beta)
    drop = start_level - smoothed[best]
    if drop < max(MIN_RELATIVE_DROP * start_level, MIN_DROP_IN_NOISE * noise):
        result["warnings"].append(
            f"uninformative curve: the smoothed loss fell only {drop:.3g} below its starting level "
            f"{start_level:.4g} (lowest {smoothed[best]:.4g} at LR {lrs[best]:.3g}), within noise of a flat "
            f"curve; no LR can be read off it. Sweep more steps (--num_iter) or a wider LR range")
        return result
    slopes = np.gradient(smoothed[warmup - 1:best + 1], np.log10(lrs[warmup - 1:best + 1]))
    steepest = warmup - 1 + int(np.argmin(slopes))
    result.update(steepest_lr=float(lrs[steepest]), suggested_lr=float(lrs[best] / 10))
    if steepest == warmup - 1:
        result["warnings"].append("the loss fell fastest at the start of the sweep; a lower --start_lr shows "
                                  "where the descent begins")
    if best == len(smoothed) - 1:
        result["warnings"].append("the loss was still falling at the end of the sweep; a higher --end_lr shows "
                                  "where it stops, the suggestion may be too low")
    if result["suggested_lr"] < lrs[0]:
        result["suggested_lr"] = float(lrs[0])
        result["warnings"].append("min_loss_lr / 10 lies below --start_lr; suggesting --start_lr, sweep lower")
    return result


# ---------------------------------------------------------------------------------------------------- the sweep

def run_sweep(cfg: Config, sweep: argparse.Namespace, classes: list[str], device: torch.device) -> dict:
    rt = Runtime(device=device)
    workers = split_cores(cfg.workers, rt)
    training = build_training(build_model(cfg, len(classes)), cfg, rt)
    # The ramp runs at the final resolution: progressive resizing is a schedule over a whole run.
    data = build_data(replace(cfg, start_image_size=0), classes, rt, workers, with_val=False)
    sampler, loader = data.sampler, data.train_loader

    def batches():  # as many epochs, in train.py's order, as the ramp needs
        for epoch in range(math.ceil(sweep.num_iter / sampler.steps_per_epoch())):
            sampler.set_epoch(epoch)
            yield from loader

    lrs, losses, smoothed, stop_reason = lr_ramp(sweep.start_lr, sweep.end_lr, sweep.num_iter), [], [], None
    smoother, bar = SmoothedLoss(sweep.smoothing), tqdm(total=sweep.num_iter, unit="step", file=sys.stdout)
    training.raw_model.train()
    for step, (lr, (images, labels, skipped)) in enumerate(zip(lrs, batches(), strict=False)):
        # Decoding on the device may find a file unreadable: then it replaces the image, its label and skipped.
        x, labels, skipped = model_batch(data.to_model_input, images, labels, skipped)
        for line in skipped:
            tqdm.write(f"Skipped an unreadable training image: {line}")
        loss, _ = train_step(training, x, labels.to(device, non_blocking=True), lr, step)
        losses.append(loss.item())  # one host sync per step: the stop rule needs every value
        smoothed.append(smoother(losses[-1]))
        bar.update()
        bar.set_postfix(lr=f"{lr:.3g}", loss=f"{smoothed[-1]:.4f}")
        if diverged(smoothed[-1], min(smoothed), sweep.divergence):
            stop_reason = (f"stopped at LR {lr:.3g}: smoothed loss {smoothed[-1]:.4g} exceeds "
                           f"{sweep.divergence:g} x its minimum {min(smoothed):.4g}")
            break
    bar.close()
    return {"lr": [float(x) for x in lrs[:len(losses)]], "loss": losses, "smoothed": smoothed,
            "stop_reason": stop_reason, "precision": training.precision,
            "optimizer": type(training.optimizer).__name__}


# ---------------------------------------------------------------------------------------------------- outputs

def plot_curve(curve: dict, result: dict, window: tuple[float, float] | None, title: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs, losses, smoothed = (np.asarray(curve[k], dtype=float) for k in ("lr", "loss", "smoothed"))
    lo, hi = window or (lrs[0], lrs[-1])
    lo, hi = max(lo, curve["start_lr"]), min(hi, curve["end_lr"])
    shown = (lrs >= lo) & (lrs <= hi) & np.isfinite(smoothed)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.set(xscale="log", xlabel="learning rate", ylabel="training loss", title=title)
    if lo >= hi or not shown.any():
        ax.set_xlim(*(window or (curve["start_lr"], curve["end_lr"])))
        ax.text(0.5, 0.5, "the sweep has no points in this LR range", ha="center", va="center",
                transform=ax.transAxes)
    else:
        ax.plot(lrs[shown], losses[shown], color="0.75", lw=1, label="loss per step")
        ax.plot(lrs[shown], smoothed[shown], lw=2, label="smoothed loss")
        ax.set_xlim(lo, hi)
        y = smoothed[shown]
        pad = 0.1 * (y.max() - y.min()) or 0.1 * abs(y.max()) or 0.1
        ax.set_ylim(y.min() - pad, y.max() + pad)  # a spike in the raw loss should not squash the curve
        for key, style, label in (("suggested_lr", "-", "suggested"), ("steepest_lr", ":", "steepest descent"),
                                  ("min_loss_lr", "--", "minimum loss")):
            if result[key] is not None and lo <= result[key] <= hi:
                ax.axvline(result[key], ls=style, color="C3" if key == "suggested_lr" else "0.4",
                           label=f"{label}: {result[key]:.3g}")
        ax.legend(loc="upper left")
    if result["suggested_lr"] is None:
        ax.text(0.98, 0.02, "uninformative curve: no suggestion", ha="right", va="bottom", color="C3",
                transform=ax.transAxes)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(out: Path, curve: dict, result: dict, settings: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "lr_finder.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["lr", "loss", "smoothed"])
        writer.writerows(zip(curve["lr"], curve["loss"], curve["smoothed"], strict=True))
    # A diverged step's NaN or inf is written as null: strict JSON readers reject NaN.
    curve_json = {k: [x if math.isfinite(x) else None for x in v] if k in ("loss", "smoothed") else v
                  for k, v in curve.items()}
    with open(out / "lr_finder.json", "w") as f:
        json.dump({**result, "settings": settings, **curve_json}, f, indent=1, allow_nan=False)
    for name, window in PLOT_RANGES.items():
        span = "swept range" if window is None else f"{window[0]:g} to {window[1]:g}"
        plot_curve(curve, result, window, f"LR range test, {name} range ({span})", out / f"lr_finder_{name}.png")


def check_output_dir(out: Path) -> None:
    """The sweep must never land in a training run: its files would sit beside, or be taken for, the run's."""
    training_dirs = {Path(Config.output_dir).resolve(), DEMO_OUTPUT_DIR.resolve()}
    run_files = [n for n in (LATEST, PREVIOUS, "metrics.csv") if (out / n).exists()]
    if out.resolve() in training_dirs or run_files:
        raise UsageError(f"{out} is a training run's output folder ({', '.join(run_files) or 'train.py default'}); "
                         f"the LR finder never writes there. Pass another --output-dir.")


def train_command(cfg: Config, explicit: dict, lr: float) -> str:
    flags = ["--demo"] if explicit.get("demo") else []
    for name in SHARED_SETTINGS:
        if name in explicit and name not in ("workers", "decode", "gpu_decode_share", "device"):
            value = explicit[name]
            flag = "--" + ("" if value or not isinstance(value, bool) else "no-") + name.replace("_", "-")
            flags.append(flag if isinstance(value, bool) else f"{flag} {value}")
    # The sweep ran one process at --batch-size; a recipe that scales --lr by the global batch wants it per
    # reference batch.
    lr /= peak_lr(1.0, cfg.lr_reference_batch, cfg.batch_size, cfg.lr_scaling)
    return " ".join(["python train.py", *flags, f"--lr {lr:.3g}"])


def main(argv: list[str] | None = None) -> int:
    cfg, sweep, explicit = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        device = torch.device(resolve_device(cfg.device))
        out = Path(sweep.output_dir)
        check_output_dir(out)
        if cfg.demo and Path(cfg.data_dir) == DEMO_DATA_DIR:
            make_demo_dataset(DEMO_DATA_DIR)
        layout = check_layout(cfg.data_dir)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UsageError("The LR finder runs as one process on one GPU; start it with python, not torchrun.")
        print(f"Data: {layout.summary()}\nSweeping LR {sweep.start_lr:g} -> {sweep.end_lr:g} over "
              f"{sweep.num_iter} steps: --optimizer {cfg.optimizer}, {cfg.arch}, batch {cfg.batch_size}, "
              f"{cfg.image_size} px, {device.type}")
        curve = run_sweep(cfg, sweep, layout.classes, device)
    except (DatasetLayoutError, UsageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("Interrupted; nothing was written.", file=sys.stderr)
        return 130
    result = suggest(curve["lr"], curve["loss"], curve["smoothed"], sweep.smoothing)
    curve.update(start_lr=sweep.start_lr, end_lr=sweep.end_lr)
    write_outputs(out, curve, result, {**{k: v for k, v in asdict(cfg).items() if k in SHARED_SETTINGS + ("demo",)},
                                         **vars(sweep)})
    if curve["stop_reason"]:
        print(curve["stop_reason"].capitalize() + ".")
    for warning in result["warnings"]:
        print(f"warning: {warning}.")
    if result["suggested_lr"] is None:
        print(f"No LR suggested. Curve and plots in {out}.")
        return 0
    if cfg.lr_reference_batch:
        print(f"Note: --recipe {cfg.recipe} with --optimizer {cfg.optimizer} counts --lr per "
              f"{cfg.lr_reference_batch} images of global batch and scales it ({cfg.lr_scaling}) to the actual one; "
              f"the command below converts this sweep's batch of {cfg.batch_size}.")
    elif cfg.device != "cpu" and torch.cuda.device_count() > 1:
        print(f"Note: train.py spreads over {torch.cuda.device_count()} GPUs, a global batch that many times "
              f"larger than this sweep's; the linear scaling rule would multiply the LR by as much.")
    print(f"Suggested peak LR for --optimizer {cfg.optimizer}: {result['suggested_lr']:.3g} (minimum loss at "
          f"{result['min_loss_lr']:.3g} / 10; "
          f"steepest descent at {result['steepest_lr']:.3g}). Train with: "
          f"{train_command(cfg, explicit, result['suggested_lr'])}   [curve and plots in {out}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
