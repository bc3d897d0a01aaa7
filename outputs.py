"""A training run's output folder: the lock that keeps a second run out of it, metrics.csv (one row per epoch,
kept across resumes), the training curves, the archive --no-resume makes of an earlier run, and the advice in
the epoch summary."""

import csv
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

import torch

from checkpoint import LATEST, PREVIOUS, UNREADABLE
from config import UsageError
from dataset_paths import data_volume
from engine import decode_route
from runtime import log

LOCK_FILE = "train.lock"


def lock_output_dir(out: Path):
    """Hold an exclusive lock on out/train.lock for as long as the returned file stays open. The kernel drops
    it when the process ends in any way, kill -9 included, so a crash never leaves a stale lock. A POSIX
    record lock, not flock: forked loader workers, which outlive a killed parent by seconds, do not inherit it.
    Refuses a folder that another run holds, and one this process cannot write in, before any work is done."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        lock = open(out / LOCK_FILE, "a+")
    except OSError as err:
        raise UsageError(f"Cannot write in the output folder {out} ({err.strerror or err}): checkpoints could not "
                         f"be saved. Fix its permissions or mount, or pass another --output-dir.") from err
    try:
        fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in (errno.EACCES, errno.EAGAIN):
            raise
        lock.seek(0)
        holder = lock.read()
        lock.close()
        raise UsageError(f"Another training run is using {out}: {describe_holder(holder)}. Two runs in one folder "
                         f"would overwrite each other's checkpoints, so this one does not start. Watch the running "
                         f"one with `tmux attach -t resnet50` if setup_and_train.sh started it (its logs are in "
                         f"{out / 'logs'}), or stop it (a plain `kill PID` saves a checkpoint first) and rerun this "
                         f"command to continue the run. For a second run, pass another --output-dir.") from None
    lock.seek(0)
    lock.truncate()
    json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
               "command": " ".join(sys.argv)}, lock)
    lock.flush()
    return lock


def where_the_run_lives(out: Path) -> str:
    """Said at start: a run on the root volume of a spot instance dies with it."""
    volume = data_volume(out)
    if volume is None:
        return (f"Run folder: {out} (on the root filesystem: a spot termination deletes it; pass --output-dir on "
                f"a persistent volume to keep the checkpoints)")
    return f"Run folder: {out} (on the volume mounted at {volume}, which outlives this instance)"


def describe_holder(text: str) -> str:
    try:
        holder = json.loads(text)
        return (f"process {holder['pid']} on {holder['host']}, started {holder['started']} as "
                f"`{holder['command']}`")
    except (ValueError, KeyError, TypeError):
        return "a process that did not say which (the lock file is empty or from another version)"

METRIC_COLUMNS = ["epoch", "lr", "train_loss", "train_acc1", "train_acc5", "val_loss", "val_acc1", "val_acc5",
                  "epoch_seconds", "images_per_second", "train_images", "val_images", "skipped_images", "image_size",
                  "val_seconds", "ema_val_loss", "ema_val_acc1", "ema_val_acc5", "data_wait_pct",
                  "first_batch_seconds", "compile_seconds"]


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


class TrainingBoard:
    """Live curves for TensorBoard in OUTPUT_DIR/tensorboard, one event file per process start. The x axis counts
    training images, which mean the same at any batch size or number of GPUs. A resumed run marks the position
    of its checkpoint as a restart: TensorBoard then hides what a killed run wrote after it, so steps redone
    after a kill replace the lost ones instead of doubling them. What was written at that very position (the
    sync point that saved, an epoch's val scores) stays, as the resumed run does not write it again.

    Records are written synchronously through one open file: an error is raised here, where the run can
    handle it, not in a writer thread."""

    def __init__(self, folder: Path, images_seen: int):
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.summary.writer.record_writer import RecordWriter

        self.Event, self.Summary = Event, Summary
        folder.mkdir(exist_ok=True)
        # Unbuffered: each record reaches the file at once, so a kill loses nothing already shown, and closing
        # after a failed write has nothing left to fail on.
        self.file = open(folder / f"events.out.tfevents.{time.time():.0f}.{socket.gethostname()}.{os.getpid()}",
                         "ab", buffering=0)
        self.records = RecordWriter(self.file)
        self.write(Event(wall_time=time.time(), step=images_seen, file_version="brain.Event:2"))
        if images_seen:
            self.write(Event(wall_time=time.time(), step=images_seen + 1,
                             session_log=SessionLog(status=SessionLog.START)))
        self.folder = folder

    def write(self, event) -> None:
        self.records.write(event.SerializeToString())

    def scalars(self, images_seen: int, values: dict) -> None:
        if self.file.closed:
            return
        summary = self.Summary(value=[self.Summary.Value(tag=name, simple_value=float(value))
                                      for name, value in values.items()])
        try:
            self.write(self.Event(wall_time=time.time(), step=images_seen, summary=summary))
        except OSError as err:
            # The curves are a view of the run, not the run: a full disk or a lost folder ends them, and the
            # next checkpoint save meets the same fault and stops the run with the whole explanation.
            self.close()
            log(f"Live curves stopped: could not write {self.folder} ({err}).")

    def close(self) -> None:
        self.file.close()


def open_board(enabled: bool, out: Path, images_seen: int) -> TrainingBoard | None:
    if not enabled:
        return None
    try:
        board = TrainingBoard(out / "tensorboard", images_seen)
    except OSError as err:
        log(f"No live curves: could not write {out / 'tensorboard'} ({err}).")
        return None
    except ImportError:
        log("TensorBoard is not installed, so there are no live curves (pip install -r requirements.txt, or pass "
            "--no-tensorboard to silence this).")
        return None
    log(f"Live curves: tensorboard --logdir {out / 'tensorboard'} (see README for viewing it from a laptop).")
    return board


def move_run_aside(output_dir: Path) -> None:
    """--no-resume never destroys a previous run: its files go to a timestamped subfolder."""
    old = [output_dir / n for n in (LATEST, PREVIOUS, "metrics.csv", "training_curves.png", "tensorboard")]
    old = [p for p in old if p.exists()] + sorted(output_dir.glob(f"{LATEST}{UNREADABLE}*"))
    if old:
        archive = output_dir / time.strftime("previous-%Y%m%d-%H%M%S")
        archive.mkdir()
        for p in old:
            os.replace(p, archive / p.name)
        log(f"--no-resume: moved the previous run's files to {archive}")


def write_epoch_outputs(out: Path, row: dict, history: list[dict]) -> None:
    try:
        append_metrics(out / "metrics.csv", [row])
        plot_history(history, out / "training_curves.png")
    except OSError as err:
        raise UsageError(f"Could not write metrics.csv or the plot in {out}: {err}. Epoch {row['epoch']} is in "
                         f"the checkpoint; free some space or fix the folder, then rerun the same command: it "
                         f"writes the missing row and continues.") from err
    except ImportError as err:
        raise UsageError(f"Could not draw {out / 'training_curves.png'}: {err}. Epoch {row['epoch']} is in the "
                         f"checkpoint; pip install -r requirements.txt, then rerun the same command.") from err


def epoch_summary(row: dict, cfg, seconds_spent: float, device_type: str, workers: int) -> str:
    """The line each epoch ends with: scores, speed, the data wait (with advice), time and money. The time to go
    assumes the epochs to come compile nothing: under progressive resizing a new size compiles once more."""
    to_go = (cfg.epochs - row["epoch"]) * (row["epoch_seconds"] - row["compile_seconds"] + row["val_seconds"])
    cost = f"{format_duration(seconds_spent)} so far, about {format_duration(to_go)} to go"
    if cfg.usd_per_hour:
        cost += (f", ${cfg.usd_per_hour * seconds_spent / 3600:,.2f} spent, about "
                 f"${cfg.usd_per_hour * (seconds_spent + to_go) / 3600:,.2f} for the run (projected)")
    return (f"epoch {row['epoch']}/{cfg.epochs}: train loss {row['train_loss']:.4f} top-1 {row['train_acc1']:.2f}% | "
            f"val loss {row['val_loss']:.4f} top-1 {row['val_acc1']:.2f}% top-5 {row['val_acc5']:.2f}% on "
            f"{row['val_images']:,} images"
            + (f" (weight average: top-1 {row['ema_val_acc1']:.2f}%)" if "ema_val_acc1" in row else "")
            + f" | {row['epoch_seconds']:.0f} s"
            + (f" ({row['compile_seconds']:.0f} s of it compiling, left out of img/s and the time to go)"
               if row["compile_seconds"] else "")
            + f", {row['images_per_second']:.0f} img/s, waiting for data "
            f"{row['data_wait_pct']:.0f}% of the time"
            + data_wait_advice(row["data_wait_pct"] / 100, cfg.decode, cfg.gpu_decode_share, device_type, workers)
            + f" | {cost}"
            + (f" | {row['skipped_images']} unreadable images skipped" if row["skipped_images"] else ""))


def format_duration(seconds: float) -> str:
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 5400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def data_wait_advice(fraction: float, decode: str, gpu_decode_share: float, device_type: str, workers: int) -> str:
    """What to try when training waited for data more than a tenth of the time, or when the GPU decodes
    JPEGs that idle workers could have decoded instead. decode is the flag; the route it took is what counts
    (--decode auto is the workers' or DALI's)."""
    if fraction < 0.02 and device_type == "cuda" and decode == "gpu" and gpu_decode_share > 0:
        return (f"; the workers keep up, so a --gpu-decode-share below {gpu_decode_share:g} may leave more of the "
                f"GPU to training")
    if fraction < 0.1:
        return ""
    decode = decode_route(decode, torch.device(device_type))[0]  # asks the GPU, so only when there is advice
    if device_type == "cuda" and decode == "cpu":
        return "; the loader workers cannot keep up: try --decode gpu or dali (pip install -r requirements-dali.txt)"
    if device_type == "cuda" and gpu_decode_share < 1:
        return f"; the loader workers cannot keep up: raise --gpu-decode-share above {gpu_decode_share:g}"
    return f"; the loader cannot keep up: try more --workers than {workers} if cores are idle, or a faster disk"
