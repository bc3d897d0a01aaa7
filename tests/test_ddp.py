"""DDP on CPU with gloo: two processes started by torchrun, as on a multi-GPU box."""

import csv
import os
import sys

import pytest
import torch
from conftest import FAST, REPO, run_job, run_train

from checkpoint import LATEST
from recipes import learning_rate


def torchrun(*args, nproc=2, timeout=300, env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO / "train.py"), *map(str, args)]
    return run_job(cmd, timeout, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def read_metrics(out):
    with open(out / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_two_processes_train_agree_count_val_exactly_and_scale_the_lr(odd_digits_dir, tmp_path):
    out = tmp_path / "ddp"
    # The default recipe's linear LR scaling (FAST's --lr 1.6 per 256 images: peak 0.4 for 2 x 32, 0.2 for one
    # process) and the weight average ride along.
    result = torchrun("--data-dir", odd_digits_dir, "--output-dir", out, *FAST, "--ema-decay", "0.9", "--epochs", 3)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Training resnet14_tiny on 2 x cpu" in result.stdout and "peak LR 0.4," in result.stdout
    assert result.stdout.count("Weights identical on all 2 ranks") == 3
    assert result.stdout.count("Data:") == 1  # rank 0 alone talks
    rows = read_metrics(out)
    assert [int(r["val_images"]) for r in rows] == [359, 359, 359]  # odd: no padding duplicates
    assert [int(r["train_images"]) for r in rows] == [1437 // 64 * 64] * 3  # global batch 2 x 32
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert float(rows[-1]["val_acc1"]) > 30 and float(rows[-1]["ema_val_acc1"]) > 30  # chance: 10%

    # One process at the same batch per process: the logged LR is half, epoch for epoch. The epochs end at
    # slightly different points of the schedule (44 against 22 steps an epoch), so each is checked against the
    # schedule at its own step, and the last, where both reach the final LR, directly.
    alone = run_train("--data-dir", odd_digits_dir, "--output-dir", tmp_path / "alone", *FAST, "--epochs", 3)
    assert alone.returncode == 0, alone.stderr
    for run_rows, peak, steps in ((rows, 0.4, 22), (read_metrics(tmp_path / "alone"), 0.2, 44)):
        assert [float(r["lr"]) for r in run_rows] == pytest.approx(
            [learning_rate("onecycle", e * steps - 1, 3 * steps, 0, peak, 0.3, 25, 1e4) for e in (1, 2, 3)], rel=1e-12)
    assert float(rows[-1]["lr"]) == pytest.approx(2 * float(read_metrics(tmp_path / "alone")[-1]["lr"]), rel=1e-12)

    # The same run continues on one process: the position is kept in images, the change is announced, and the
    # LR follows the new global batch.
    single = run_train("--data-dir", odd_digits_dir, "--output-dir", out, *FAST, "--ema-decay", "0.9", "--epochs", 4)
    assert single.returncode == 0, single.stderr
    assert "processes: 2 -> 1" in single.stdout and "peak LR 0.2," in single.stdout
    assert torch.load(out / LATEST, map_location="cpu", weights_only=True)["epoch"] == 4
