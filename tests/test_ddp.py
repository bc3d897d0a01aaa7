"""DDP on CPU with gloo: two processes started by torchrun, as on a multi-GPU box."""

import csv
import os
import subprocess
import sys

import torch
from conftest import FAST, REPO, run_train

from checkpoint import LATEST


def torchrun(*args, nproc=2, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO / "train.py"), *map(str, args)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def test_two_processes_train_agree_and_count_val_exactly(odd_digits_dir, tmp_path):
    out = tmp_path / "ddp"
    # Linear LR scaling (0.1 per 32 images: peak 0.2 for 2 x 32) and the weight average ride along.
    scaled = ["--lr", "0.1", "--lr-reference-batch", "32", "--ema-decay", "0.9"]
    result = torchrun("--data-dir", odd_digits_dir, "--output-dir", out, *FAST, *scaled, "--epochs", 3)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Training resnet14_tiny on 2 x cpu" in result.stdout and "peak LR 0.2," in result.stdout
    assert result.stdout.count("Weights identical on all 2 ranks") == 3
    assert result.stdout.count("Data:") == 1  # rank 0 alone talks
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["val_images"]) for r in rows] == [359, 359, 359]  # odd: no padding duplicates
    assert [int(r["train_images"]) for r in rows] == [1437 // 64 * 64] * 3  # global batch 2 x 32
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert float(rows[-1]["val_acc1"]) > 40 and float(rows[-1]["ema_val_acc1"]) > 40

    # The same run continues on one process: the position is kept in images, the change is announced.
    single = run_train("--data-dir", odd_digits_dir, "--output-dir", out, *FAST, *scaled, "--epochs", 4)
    assert single.returncode == 0, single.stderr
    assert "processes: 2 -> 1" in single.stdout and "peak LR 0.1," in single.stdout
    assert torch.load(out / LATEST, map_location="cpu", weights_only=True)["epoch"] == 4
