"""Exact resume: a run killed at random moments and rerun ends bit-identical to one never interrupted."""

import csv
import json
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ARGS, FAST, REPO, kill_job, run_train, start_job, train_cmd

from checkpoint import LATEST, load_latest_checkpoint


def final_state(out):
    return torch.load(out / LATEST, map_location="cpu", weights_only=True)


def metrics(out):
    with open(out / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def wait_for_new_checkpoint(out, proc, previous_mtime, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            mtime = (out / LATEST).stat().st_mtime_ns
        except FileNotFoundError:  # not written yet, or between a save's two renames (load falls back to PREVIOUS)
            mtime = previous_mtime
        if mtime != previous_mtime:
            return mtime
        assert proc.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.02)
    raise AssertionError("no checkpoint was written in time")


def assert_same_run(out, reference):
    ours, theirs = final_state(out), final_state(reference)
    assert ours["model"].keys() == theirs["model"].keys()
    for name, tensor in theirs["model"].items():
        assert torch.equal(ours["model"][name], tensor), name
    for name, tensor in theirs["ema"].items():
        assert torch.equal(ours["ema"][name], tensor), f"ema {name}"
    assert ours["optimizer"]["state"].keys() == theirs["optimizer"]["state"].keys()
    for key, value in theirs["optimizer"]["state"].items():
        assert torch.equal(ours["optimizer"]["state"][key]["momentum_buffer"], value["momentum_buffer"])
    rows, expected = metrics(out), metrics(reference)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    for row, exp in zip(rows, expected, strict=True):
        for column in ("val_loss", "val_acc1", "val_acc5", "train_acc1", "train_acc5", "train_images", "ema_val_acc1"):
            assert row[column] == exp[column], column
        assert float(row["train_loss"]) == pytest.approx(float(exp["train_loss"]), rel=1e-12)


def test_sigkill_at_random_moments_then_rerun_is_bit_identical(digits_dir, tmp_path, uninterrupted):
    out = tmp_path / "killed"
    rng = random.Random(1)
    positions, mtime = [], None
    for _ in range(4):
        proc = start_job(train_cmd("--data-dir", digits_dir, "--output-dir", out, *ARGS),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        mtime = wait_for_new_checkpoint(out, proc, mtime)
        time.sleep(rng.uniform(0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state = load_latest_checkpoint(out)  # a kill between a save's two renames leaves only PREVIOUS
        positions.append((state["epoch"], state["samples_done"]))
    assert any(done > 0 for _, done in positions), f"no kill landed mid-epoch: {positions}"
    result = run_train("--data-dir", digits_dir, "--output-dir", out, *ARGS)
    assert result.returncode == 0, result.stderr
    assert "Resuming" in result.stdout
    assert_same_run(out, uninterrupted)


def test_sigterm_saves_and_exits_0_quickly_then_the_rerun_continues(digits_dir, tmp_path, uninterrupted):
    out = tmp_path / "terminated"
    proc = start_job(train_cmd("--data-dir", digits_dir, "--output-dir", out, *ARGS),
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_new_checkpoint(out, proc, None)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert time.monotonic() - sent < 10
    assert "Stopped by SIGTERM" in stdout and "Rerun the same command" in stdout
    state = final_state(out)
    assert state["epoch"] < 2
    result = run_train("--data-dir", digits_dir, "--output-dir", out, *ARGS)
    assert result.returncode == 0, result.stderr
    assert f"epoch {state['epoch'] + 1}, {state['samples_done']:,}/1,437 images of it done" in result.stdout
    assert_same_run(out, uninterrupted)


def test_evaluate_py_reproduces_the_logged_scores_of_the_model_and_of_its_weight_average(uninterrupted):
    """The run validated with flip averaging and kept a weight average: evaluate.py follows the run's flip
    setting by default and scores either set of weights exactly as train.py logged them."""
    last = metrics(uninterrupted)[-1]
    state = final_state(uninterrupted)
    assert state["ema"].keys() == state["model"].keys()
    assert any(not torch.equal(state["ema"][k], state["model"][k]) for k in state["model"])

    def evaluate(*flags):
        done = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--checkpoint", str(uninterrupted / LATEST),
                               "--device", "cpu", "--workers", "1", "--json", *flags],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    plain, averaged = evaluate(), evaluate("--ema")
    assert plain["tta_flip"] is True and plain["acc1"] == pytest.approx(float(last["val_acc1"]), abs=1e-9)
    assert plain["loss"] == pytest.approx(float(last["val_loss"]), rel=1e-6)  # the loss tells a flip from none
    assert averaged["weight_average"] is True
    assert averaged["acc1"] == pytest.approx(float(last["ema_val_acc1"]), abs=1e-9)
    assert averaged["loss"] == pytest.approx(float(last["ema_val_loss"]), rel=1e-6)
    assert averaged["logged_val_acc1"] == pytest.approx(float(last["ema_val_acc1"]), abs=1e-9)


def test_live_curves_survive_a_kill_with_one_strictly_increasing_step_axis(digits_dir, tmp_path):
    """SIGKILL in epoch 2, after the sync points of some of its steps reached TensorBoard but before any checkpoint
    of it: the rerun redoes those steps, and TensorBoard shows each once, ending at metrics.csv's val top-1."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    args = ["--data-dir", digits_dir, "--output-dir", out, *FAST, "--epochs", 2, "--log-every", 3]
    run = start_job(train_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_new_checkpoint(out, run, None)  # the end of epoch 1
    events = out / "tensorboard"
    written = sum(f.stat().st_size for f in events.iterdir())
    deadline = time.monotonic() + 60
    while sum(f.stat().st_size for f in events.iterdir()) == written:  # a sync point of epoch 2 is on disk
        assert run.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    run.kill()
    run.wait()
    # Its loader worker notices the parent's death within seconds, but holds the output pipes until then; a
    # worker forked in the instant of the kill was once seen never to notice (it saw init as its parent).
    kill_job(run)
    assert load_latest_checkpoint(out)["epoch"] == 1
    rerun = run_train(*args)
    assert rerun.returncode == 0 and "Resuming" in rerun.stdout, rerun.stderr

    board = EventAccumulator(str(events), size_guidance={"scalars": 0})
    board.Reload()
    for tag in ("train/loss", "train/top1", "train/lr", "speed/images_per_second", "speed/data_wait_pct"):
        steps = [e.step for e in board.Scalars(tag)]
        assert steps == sorted(set(steps)) and len(steps) == 2 * 15, tag  # 44 steps an epoch: 15 sync points
    [first, last] = board.Scalars("val/acc1")
    assert last.step == 2 * 1437 and last.value == pytest.approx(float(metrics(out)[-1]["val_acc1"]), rel=1e-6)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_bf16_and_fp16_on_the_cpu_train_like_fp32_and_resume_after_sigterm(digits_dir, tmp_path, uninterrupted,
                                                                            precision):
    """The GPU's mixed-precision paths run for real on the CPU: bf16 autocast, and fp16 with its loss scaler. A run
    stopped in the middle of epoch 2 and continued ends near the fp32 run of the same settings (seeds alone move
    its val top-1 by up to 7 points at 2 epochs; chance is 10%), with one metrics row per epoch."""
    out = tmp_path / precision
    args = ["--data-dir", digits_dir, "--output-dir", out, *ARGS, "--precision", precision]
    proc = subprocess.Popen(train_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    mtime = None
    while True:
        mtime = wait_for_new_checkpoint(out, proc, mtime)
        state = load_latest_checkpoint(out)
        if state["epoch"] == 1 and state["samples_done"] > 0:
            break
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Stopped by SIGTERM" in stdout, stderr
    assert f"on 1 x cpu ({precision})" in stdout
    assert ("several times slower than fp32" in stdout) == (precision == "fp16")
    stopped = final_state(out)
    assert stopped["epoch"] == 1 and stopped["samples_done"] > 0
    result = run_train(*args)
    assert result.returncode == 0, result.stderr
    assert f"epoch 2, {stopped['samples_done']:,}/1,437 images of it done" in result.stdout
    rows, reference = metrics(out), metrics(uninterrupted)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert float(rows[-1]["val_acc1"]) > 40
    assert abs(float(rows[-1]["val_acc1"]) - float(reference[-1]["val_acc1"])) <= 10
    saved_scaler, final_scaler = stopped["grad_scaler"], final_state(out)["grad_scaler"]
    if precision == "bf16":
        assert saved_scaler == final_scaler == {}  # no loss scaling: bf16 has fp32's range
        return
    # Early steps' scaled gradients overflowed fp16: the scaler skipped them and lowered its scale from 2**16, which
    # is no error. The rerun carries on from the saved scaler: the same scale, and its count of good steps since
    # the last skip goes on from the saved one (a fresh scaler would restart from 2**16 and 0).
    assert saved_scaler["scale"] < 2 ** 16
    steps_after_resume = 2 * 44 - (44 + stopped["samples_done"] // 32)
    assert final_scaler["scale"] == saved_scaler["scale"]
    assert final_scaler["_growth_tracker"] == saved_scaler["_growth_tracker"] + steps_after_resume
