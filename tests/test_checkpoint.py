"""Checkpoint rotation: an unreadable checkpoint.pth is set aside, never kept as the fallback."""

import shutil

import pytest
import torch
from conftest import FAST, run_train
from test_resume import metrics

from checkpoint import LATEST, PREVIOUS, UNREADABLE, CheckpointError, load_latest_checkpoint, save_checkpoint


def state(epoch):
    return {"model": {"w": torch.full((4,), float(epoch))}, "optimizer": {}, "epoch": epoch, "samples_done": 0,
            "config": {}, "class_names": ["a", "b"]}


def set_aside(out):
    return sorted(out.glob(f"{LATEST}{UNREADABLE}*"))


def truncate(path, size=100):
    path.write_bytes(path.read_bytes()[:size])


def test_an_unreadable_latest_is_moved_aside_at_load_and_never_becomes_the_fallback(tmp_path):
    for epoch in (1, 2):
        save_checkpoint(state(epoch), tmp_path)
    truncate(tmp_path / LATEST)
    lines = []
    assert load_latest_checkpoint(tmp_path, lines.append)["epoch"] == 1
    (aside,) = set_aside(tmp_path)
    assert aside.stat().st_size == 100  # kept as it was, for the user to inspect
    assert any(str(aside) in line for line in lines) and not (tmp_path / LATEST).exists()

    # The first save after the fallback rotates nothing: the file it resumed from stays the fallback.
    save_checkpoint(state(2), tmp_path)
    assert torch.load(tmp_path / PREVIOUS, weights_only=True)["epoch"] == 1
    truncate(tmp_path / LATEST)  # a second bad write
    assert load_latest_checkpoint(tmp_path, lines.append)["epoch"] == 1
    assert len(set_aside(tmp_path)) == 2


def test_when_nothing_reads_nothing_is_moved(tmp_path):
    (tmp_path / LATEST).write_bytes(b"garbage")
    (tmp_path / PREVIOUS).write_bytes(b"")
    with pytest.raises(CheckpointError, match="none can be read"):
        load_latest_checkpoint(tmp_path, lambda line: None)
    assert (tmp_path / LATEST).read_bytes() == b"garbage" and set_aside(tmp_path) == []


def test_a_readable_latest_is_rotated_without_being_read_again(tmp_path, monkeypatch):
    save_checkpoint(state(1), tmp_path)
    assert load_latest_checkpoint(tmp_path, lambda line: None)["epoch"] == 1
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a save read a checkpoint back"))
    save_checkpoint(state(2), tmp_path)
    monkeypatch.undo()
    assert torch.load(tmp_path / PREVIOUS, weights_only=True)["epoch"] == 1 and set_aside(tmp_path) == []


def test_two_bad_writes_in_a_row_still_leave_a_run_to_continue(digits_dir, two_epochs, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(two_epochs, out)  # checkpoint.pth: epoch 2, checkpoint_prev.pth: epoch 1
    args = ["--data-dir", digits_dir, "--output-dir", out, *FAST, "--checkpoint-minutes", 1000]
    truncate(out / LATEST)
    # Falls back to epoch 1 and redoes epoch 2, whose save is the only one of this run.
    again = run_train(*args, "--epochs", 2)
    assert again.returncode == 0, again.stderr
    assert "epoch 2, 0/1,437 images of it done" in again.stdout
    truncate(out / LATEST)
    result = run_train(*args, "--epochs", 3)
    assert result.returncode == 0, result.stderr
    assert "Resuming from the older checkpoint" in result.stdout
    assert "epoch 2, 0/1,437 images of it done" in result.stdout  # epoch 1's checkpoint, not from scratch
    assert [r["epoch"] for r in metrics(out)] == ["1", "2", "3"]
    assert len(set_aside(out)) == 2 and "Moved the unreadable" in again.stdout + result.stdout
    assert torch.load(out / LATEST, weights_only=True)["epoch"] == 3
    assert torch.load(out / PREVIOUS, weights_only=True)["epoch"] == 2
