"""Checkpoint files that survive kills, full disks and corruption.

A save writes a temporary file beside the target, fsyncs it, moves the current checkpoint.pth to
checkpoint_prev.pth and renames the temporary file to checkpoint.pth. A kill at any moment therefore
leaves at least one complete file, and a load takes the newest one that reads back. Checkpoints hold only
tensors and plain Python values so that `torch.load(path, weights_only=True)` opens them on any torch.

checkpoint_prev.pth is the fallback, so only a readable file may become it. A save rotates whatever
checkpoint.pth is without reading it again (hundreds of MB), which is safe because of who calls it: the
process that saves is the one that loaded, and a load that finds checkpoint.pth unreadable moves it aside
(checkpoint.pth.unreadable-<time>) before falling back; from then on checkpoint.pth is a file that process
read back or wrote and fsynced itself.
"""

import os
import time
from pathlib import Path

import torch

LATEST = "checkpoint.pth"
PREVIOUS = "checkpoint_prev.pth"
UNREADABLE = ".unreadable-"  # LATEST + this + a time: a corrupt checkpoint kept for the user, out of the rotation
REQUIRED_KEYS = ("model", "optimizer", "epoch", "samples_done", "config", "class_names")


class CheckpointError(Exception):
    """No usable checkpoint where one was expected; the message says what to do."""


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(state: dict, path: Path) -> None:
    with open(path, "wb") as f:
        try:
            torch.save(state, f)
        except RuntimeError as err:
            # A disk that fills up inside torch.save fails its zip writer's cleanup too, and the RuntimeError of
            # that cleanup hides the OSError that says what happened.
            if isinstance(err.__context__, OSError):
                raise err.__context__ from None
            raise
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(state: dict, output_dir: Path) -> Path:
    """Atomically replace output_dir/checkpoint.pth, keeping the one before as checkpoint_prev.pth.

    On any error (disk full, read-only folder) the temporary file is removed and the error propagates;
    the existing checkpoints are untouched because they are only renamed after the new file is complete.
    """
    output_dir = Path(output_dir)
    latest, tmp = output_dir / LATEST, output_dir / f"{LATEST}.tmp-{os.getpid()}"
    try:
        write_synced(state, tmp)
        if latest.exists():
            os.replace(latest, output_dir / PREVIOUS)
        os.replace(tmp, latest)
        fsync_dir(output_dir)
    finally:
        tmp.unlink(missing_ok=True)
    return latest


def remove_stale_temporaries(output_dir: Path) -> None:
    """Temporary files left by a save that was killed halfway are never valid; delete them."""
    for stale in Path(output_dir).glob(f"{LATEST}.tmp-*"):
        stale.unlink(missing_ok=True)


def read_checkpoint(path: Path) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    missing = [k for k in REQUIRED_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"not a training checkpoint (missing {', '.join(missing)})")
    return state


def move_aside(path: Path) -> Path:
    """Rename an unreadable checkpoint to path.unreadable-<time>: kept for the user, never loaded or rotated."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside, n = path.with_name(f"{path.name}{UNREADABLE}{stamp}"), 1
    while aside.exists():  # two in the same second must not overwrite each other
        n += 1
        aside = path.with_name(f"{path.name}{UNREADABLE}{stamp}-{n}")
    os.replace(path, aside)
    return aside


def load_latest_checkpoint(output_dir: Path, log=print) -> dict | None:
    """The newest readable checkpoint in output_dir, or None if there is none at all.

    An unreadable file is reported and the previous one tried. When that one reads, the unreadable
    checkpoint.pth is moved aside, so that the next save keeps the readable one as checkpoint_prev.pth:
    call this only from the process that saves next, never beside a running save. If files exist but
    none can be read, CheckpointError is raised and nothing is moved, rather than silently starting over.
    """
    output_dir = Path(output_dir)
    candidates = [p for p in (output_dir / LATEST, output_dir / PREVIOUS) if p.exists()]
    problems, broken_latest = [], None
    for path in candidates:
        try:
            state = read_checkpoint(path)
        except Exception as err:  # any failure to read means "unusable": report it and try the next file
            problems.append(f"{path.name}: {type(err).__name__}: {str(err)[:200]}")
            log(f"Checkpoint {path} is unreadable ({problems[-1]}).")
            if path.name == LATEST:
                broken_latest = path
            continue
        if broken_latest is not None:
            log(f"Moved the unreadable {LATEST} to {move_aside(broken_latest)}; the next save keeps {path.name} "
                f"as the fallback.")
        if problems:
            log(f"Resuming from the older checkpoint {path}; the work since it was written is redone.")
        return state
    if problems:
        raise CheckpointError(
            f"Found checkpoints in {output_dir} but none can be read ({'; '.join(problems)}). Refusing to "
            f"start over silently: rerun with --no-resume to start a new run (the unreadable files are "
            f"moved aside, not deleted), or restore a good checkpoint.pth there.")
    return None
