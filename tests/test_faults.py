"""Faults inflicted on real (small, CPU) training runs: a kill inside a checkpoint write, a full disk, bad
images, a dying DDP rank, and data or output folders that vanish or turn read-only mid-run."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager

import pytest
import torch
from conftest import FAST, REPO, add_odd_images, run_job, run_train, start_job, train_cmd
from test_resume import ARGS, assert_same_run, metrics, wait_for_new_checkpoint

from checkpoint import LATEST, load_latest_checkpoint
from data import MAX_CONSECUTIVE_BAD, TrainBatchSampler

# Continuing runs save at every sync point (every 3 steps), so a fault soon meets a save or a fresh batch.
CONTINUE = [*FAST, "--epochs", "2", "--checkpoint-minutes", "0.0001", "--log-every", "3"]


# train.py with every save held 2 s between its complete temporary file and the renames, so that a kill lands
# inside a save on purpose, not by luck. The pause is patched into that process: the code ships no test hook.
SLOW_SAVES = f"""
import sys, time
sys.path.insert(0, {str(REPO)!r})
import checkpoint, train
write = checkpoint.write_synced
def slow(*args):
    write(*args)
    time.sleep(2)
checkpoint.write_synced = slow
sys.exit(train.main(sys.argv[1:]))
"""


def popen_train(*args, slow_saves=False, **kwargs) -> subprocess.Popen:
    cmd = [sys.executable, "-c", SLOW_SAVES, *map(str, args)] if slow_saves else train_cmd(*args)
    return start_job(cmd, **{"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **kwargs})


def temporaries(out):
    return sorted(out.glob(f"{LATEST}.tmp-*"))


def continued(one_epoch, folder):
    shutil.copytree(one_epoch, folder)
    return folder, (folder / LATEST).read_bytes()


@contextmanager
def mounted(*mount_args, target):
    """A mount for the duration, or a skip where this machine does not allow mounting (not root)."""
    done = subprocess.run(["mount", *map(str, mount_args), str(target)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount here: {done.stderr.strip()}")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=True)


# ---------------------------------------------------------------------------------------- kill inside a save

@pytest.mark.slow
def test_sigkill_inside_a_checkpoint_write_then_rerun_is_bit_identical(digits_dir, tmp_path, uninterrupted):
    out = tmp_path / "killed"
    # Saves only at epoch ends, each held 2 s after the temporary file is complete: the second save (end of
    # epoch 2) is killed before its renames, with epoch 1's row already in metrics.csv.
    proc = popen_train("--data-dir", digits_dir, "--output-dir", out, *ARGS, "--checkpoint-minutes", 100,
                       slow_saves=True)
    for save in (1, 2):
        while not temporaries(out):
            assert proc.poll() is None, proc.communicate()[1]
            time.sleep(0.01)
        if save == 1:
            while temporaries(out):
                time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert len(temporaries(out)) == 1  # the kill landed inside the write, between the fsync and the renames
    assert torch.load(out / LATEST, weights_only=True)["epoch"] == 1
    assert [r["epoch"] for r in metrics(out)] == ["1"]

    result = run_train("--data-dir", digits_dir, "--output-dir", out, *ARGS)
    assert result.returncode == 0, result.stderr
    assert "Resuming" in result.stdout and "unreadable" not in result.stdout
    assert temporaries(out) == []
    assert_same_run(out, uninterrupted)  # also: metrics.csv holds epochs 1 and 2 once each


# ---------------------------------------------------------------------------------------- stop signals

def children(pid: int) -> list[int]:
    """The processes whose parent is pid, read from /proc."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:  # the process ended while we looked
            continue
        if parent == pid:
            found.append(int(entry.name))
    return found


def wait_for_line(log, text, proc, timeout=120):
    """Wait until the run's output file holds `text`."""
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no {text!r} in time"
        time.sleep(0.01)


def start_training(out, log, digits_dir):
    """A run in the foreground of a terminal, as far as signals go (SIGINT at its default, whatever this process
    inherited), saving only at the end of its one epoch; returned once its loader worker has set its signals."""
    with open(log, "w") as f:
        run = popen_train("--data-dir", digits_dir, "--output-dir", out, *FAST, "--batch-size", 8, "--epochs", 1,
                          "--log-every", 1000, "--checkpoint-minutes", 100, stdout=f, stderr=subprocess.STDOUT,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for_line(log, "epoch 1/1", run)
    deadline = time.monotonic() + 60
    while not any(ignores_sigint(pid) for pid in children(run.pid)):
        assert run.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.01)
    time.sleep(0.1)  # the worker sets its SIGTERM handler right after it ignores SIGINT
    return run


def ignores_sigint(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            ignored = int(f.read().split("SigIgn:")[1].split()[0], 16)
    except OSError:
        return False
    return bool(ignored & 1 << (signal.SIGINT - 1))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_a_spot_notice_to_the_whole_process_group_saves_and_exits_0(digits_dir, tmp_path, sig):
    """Ctrl-C in a terminal and a spot interruption signal every process of the run, loader workers included.
    The one sync point is the epoch's last step, so the loop needs some 170 more batches from the workers after
    the signal. No periodic save is due: a checkpoint at that step (epoch 1, 1,432 images into it) rather than
    at the start of epoch 2 is the stop's own."""
    out, log = tmp_path / "run", tmp_path / "run.log"
    run = start_training(out, log, digits_dir)
    os.killpg(run.pid, sig)
    assert run.wait(timeout=60) == 0, log.read_text()[-3000:]
    assert f"Stopped by {sig.name}; checkpoint saved at epoch 1" in log.read_text()
    state = load_latest_checkpoint(out)
    assert (state["epoch"], state["samples_done"]) == (0, 1437 // 8 * 8)


def test_a_second_ctrl_c_quits_at_once_without_saving(digits_dir, tmp_path):
    """The first Ctrl-C asks for a save at the next sync point, which here is the end of the epoch; the second
    one, sent as soon as the first is acknowledged, ends the run before it."""
    out, log = tmp_path / "run", tmp_path / "run.log"
    run = start_training(out, log, digits_dir)
    os.killpg(run.pid, signal.SIGINT)
    wait_for_line(log, "SIGINT received", run)
    sent = time.monotonic()
    os.killpg(run.pid, signal.SIGINT)
    code = run.wait(timeout=60)
    assert code == -signal.SIGINT, log.read_text()[-3000:]  # Python's exit for an unhandled KeyboardInterrupt
    assert time.monotonic() - sent < 10
    assert "Stopped by" not in log.read_text() and not (out / LATEST).exists() and temporaries(out) == []


# ---------------------------------------------------------------------------------------- metrics.csv

# train.py and its loader workers killed (SIGKILL, as by kill -9 on the job) the first time it writes an epoch's
# row: after that epoch's checkpoint is saved, before metrics.csv holds its row.
KILLED_BEFORE_THE_ROW = f"""
import os, signal, sys
sys.path.insert(0, {str(REPO)!r})
import outputs, train
def killed(*args):
    os.killpg(0, signal.SIGKILL)
outputs.write_epoch_outputs = killed
sys.exit(train.main(sys.argv[1:]))
"""


def test_a_row_a_kill_kept_out_of_metrics_csv_is_written_on_resume(digits_dir, tmp_path):
    out = tmp_path / "run"
    args = ["--data-dir", digits_dir, "--output-dir", out, *FAST, "--epochs", 1]
    killed = run_job([sys.executable, "-c", KILLED_BEFORE_THE_ROW, *map(str, args)], 300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    saved = load_latest_checkpoint(out)
    assert saved["epoch"] == 1 and not (out / "metrics.csv").exists()

    rerun = run_train(*args)  # finds the run finished, and writes what the file lacks
    assert rerun.returncode == 0 and "already finished" in rerun.stdout, rerun.stderr
    [row] = metrics(out)
    expected = saved["history"][0]
    assert int(row["epoch"]) == 1 and int(row["train_images"]) == expected["train_images"] == 1437 // 32 * 32
    for column in ("val_acc1", "val_acc5", "val_loss", "train_loss", "lr"):
        assert float(row[column]) == pytest.approx(expected[column], rel=1e-12), column


# ---------------------------------------------------------------------------------------- full disk

def test_a_full_disk_stops_the_run_clearly_and_keeps_the_last_checkpoint(digits_dir, one_epoch, tmp_path):
    out, before = continued(one_epoch, tmp_path / "source")
    used = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    disk = tmp_path / "disk"
    disk.mkdir()
    # Room for what is there and half a checkpoint more: the first save of epoch 2 cannot complete.
    size = used + len(before) // 2
    with mounted("-t", "tmpfs", "-o", f"size={size}", "tmpfs", target=disk):
        shutil.copytree(out, disk, dirs_exist_ok=True)
        result = run_train("--data-dir", digits_dir, "--output-dir", disk, *CONTINUE)
        assert result.returncode == 2, result.stderr[-3000:]
        assert "Traceback" not in result.stderr
        assert f"Could not save a checkpoint in {disk}" in result.stderr
        assert "No space left on device" in result.stderr and "intact" in result.stderr
        assert (disk / LATEST).read_bytes() == before
        assert temporaries(disk) == []
        assert load_latest_checkpoint(disk)["epoch"] == 1
        assert [r["epoch"] for r in metrics(disk)] == ["1"]


# ---------------------------------------------------------------------------------------- bad images

def expected_train_skips(num_images, broken, epoch):
    """Unreadable files met in an epoch: each sampled broken file, plus the broken ones after it that its
    replacement chain walks through (the next file in the list replaces an unreadable one)."""
    sampler = TrainBatchSampler(num_images, 32, 0, 1, seed=0)
    sampler.set_epoch(epoch)
    count = 0
    for batch in sampler:
        for _, index in batch:
            i = index
            while i in broken and i - index < MAX_CONSECUTIVE_BAD:
                count, i = count + 1, i + 1
    return count


def test_bad_images_are_skipped_counted_and_named_and_the_run_completes(digits_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(digits_dir, data)
    names = add_odd_images(data / "train" / "digit_3")
    add_odd_images(data / "val" / "digit_7")
    out = tmp_path / "run"
    result = run_train("--data-dir", data, "--output-dir", out, *FAST, "--epochs", 2)
    assert result.returncode == 0, result.stderr
    for name in names:
        assert f"digit_3/{name}" in result.stdout and f"digit_7/{name}" in result.stdout

    train_names = sorted(p.name for p in (data / "train" / "digit_3").iterdir())
    first = sum(len(list((data / "train" / f"digit_{c}").iterdir())) for c in range(3))
    broken = {first + train_names.index(n) for n in names}
    rows = metrics(out)
    assert [int(r["val_images"]) for r in rows] == [363, 363]  # 360 + 3 readable odd ones; broken left out
    assert [int(r["train_images"]) for r in rows] == [1443 // 32 * 32] * 2
    expected = [expected_train_skips(1443, broken, epoch) + 3 for epoch in (0, 1)]
    assert [int(r["skipped_images"]) for r in rows] == expected
    assert f"| {expected[0]} unreadable images skipped" in result.stdout


def test_sixteen_unreadable_training_images_in_a_row_stop_the_run(digits_dir, tmp_path):
    """A class folder of unreadable files is what a failing volume looks like: no image replaces them, so the
    run stops, naming the files, instead of training on whatever the disk still returns."""
    data = tmp_path / "data"
    shutil.copytree(digits_dir, data)
    broken = sorted((data / "train" / "digit_3").iterdir())
    for path in broken:
        path.write_bytes(b"")
    out = tmp_path / "run"
    result = run_train("--data-dir", data, "--output-dir", out, *FAST, "--epochs", 1)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"{MAX_CONSECUTIVE_BAD} unreadable images in a row, starting at {data / 'train' / 'digit_3'}" \
        in result.stderr and "is the data volume failing?" in result.stderr
    named = [p for p in broken if f"{p} (" in result.stderr]
    assert len(named) == MAX_CONSECUTIVE_BAD and "intact" in result.stderr
    assert not (out / LATEST).exists() and not (out / "metrics.csv").exists()


# ---------------------------------------------------------------------------------------- folders vanish

def wait_for_exit(proc, timeout=60):
    stdout, stderr = proc.communicate(timeout=timeout)
    return proc.returncode, stdout, stderr


@pytest.mark.slow
def test_a_data_folder_that_vanishes_stops_the_run_and_the_rerun_resumes(digits_dir, one_epoch, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(digits_dir, data)
    out, before = continued(one_epoch, tmp_path / "run")
    proc = popen_train("--data-dir", data, "--output-dir", out, *CONTINUE)
    wait_for_new_checkpoint(out, proc, (out / LATEST).stat().st_mtime_ns)
    data.rename(tmp_path / "unmounted")
    code, _, stderr = wait_for_exit(proc)
    # Not "every image unreadable, skipped": the run stops and says why.
    assert code == 2 and "Traceback" not in stderr, stderr[-3000:]
    assert f"the training data in {data} disappeared" in stderr and "intact" in stderr
    assert temporaries(out) == [] and load_latest_checkpoint(out)["epoch"] == 1

    (tmp_path / "unmounted").rename(data)
    result = run_train("--data-dir", data, "--output-dir", out, *CONTINUE)
    assert result.returncode == 0, result.stderr
    assert "Resuming" in result.stdout and "images of it done" in result.stdout
    assert [r["epoch"] for r in metrics(out)] == ["1", "2"]


@pytest.mark.parametrize("fault", ["moved", "read-only"])
def test_an_output_folder_that_vanishes_or_turns_read_only_stops_cleanly(digits_dir, one_epoch, tmp_path, fault):
    out, _ = continued(one_epoch, tmp_path / "run")
    with ExitStack() as stack:
        proc = popen_train("--data-dir", digits_dir, "--output-dir", out, *CONTINUE)
        wait_for_new_checkpoint(out, proc, (out / LATEST).stat().st_mtime_ns)
        if fault == "moved":
            out.rename(tmp_path / "moved")
        else:
            # As root chmod stops nothing, and a remount read-only is refused while the run holds its lock and
            # event files open for writing; a read-only filesystem mounted over the folder turns every new file
            # there read-only, as a volume the kernel remounts read-only after an I/O error does.
            stack.enter_context(mounted("-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", target=out))
        code, _, stderr = wait_for_exit(proc)
    assert code == 2 and "Traceback" not in stderr, stderr[-3000:]
    if fault == "moved":
        assert f"The output folder {out} disappeared" in stderr
        assert not out.exists()  # not recreated: nothing is written beside an unmounted volume's mount point
        out = tmp_path / "moved"
    else:
        assert f"Could not save a checkpoint in {out}" in stderr and "Read-only file system" in stderr
    assert temporaries(out) == [] and load_latest_checkpoint(out)["epoch"] == 1


# ---------------------------------------------------------------------------------------- a DDP rank dies

def torchrun(*args, restarts=0, **popen_kwargs):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           f"--max-restarts={restarts}", str(REPO / "train.py"), *map(str, args)]
    return start_job(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen_kwargs)


def worker_pid(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of torchrun's worker process with this rank, read from /proc (children and environments)."""
    for pid in children(launcher.pid):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:  # the process ended while we looked
            continue
        if f"RANK={rank}".encode() in env:
            return pid
    raise AssertionError(f"no worker with rank {rank} under torchrun {launcher.pid}")


@pytest.mark.slow
def test_a_dead_ddp_rank_ends_the_job_promptly_and_max_restarts_resumes_it(digits_dir, tmp_path):
    out = tmp_path / "ddp"
    args = ["--data-dir", digits_dir, "--output-dir", out, *CONTINUE]
    job = torchrun(*args)
    wait_for_new_checkpoint(out, job, None)
    dead = worker_pid(job, 1)
    os.kill(dead, signal.SIGKILL)
    killed = time.monotonic()
    output, _ = job.communicate(timeout=120)
    assert job.returncode != 0
    assert time.monotonic() - killed < 60  # no hang: torchrun stops the survivor
    root_cause = output.split("Root Cause (first observed failure):", 1)[1]
    assert "rank      : 1 (local_rank: 1)" in root_cause and f"(pid: {dead})" in root_cause, output[-3000:]
    assert f"Signal 9 (SIGKILL) received by PID {dead}" in root_cause
    assert load_latest_checkpoint(out)["epoch"] == 0 and temporaries(out) == []

    # The same command with --max-restarts: the rank dies once more and torchrun restarts both, which resume.
    job = torchrun(*args, restarts=1)
    wait_for_new_checkpoint(out, job, (out / LATEST).stat().st_mtime_ns)
    os.kill(worker_pid(job, 1), signal.SIGKILL)
    output, _ = job.communicate(timeout=240)
    assert job.returncode == 0, output[-3000:]
    assert output.count("Resuming") == 2 and "Training finished" in output
    assert load_latest_checkpoint(out)["epoch"] == 2
    assert [r["epoch"] for r in metrics(out)] == ["1", "2"]


# ---------------------------------------------------------------------------------------- one folder, one run

def test_a_second_run_is_refused_and_a_killed_one_leaves_no_lock(digits_dir, tmp_path):
    out = tmp_path / "run"
    args = ["--data-dir", digits_dir, "--output-dir", out, *CONTINUE]
    first = popen_train(*args, "--epochs", 50)
    wait_for_new_checkpoint(out, first, None)
    second = run_train(*args)
    command = " ".join(train_cmd(*args, "--epochs", 50)[1:])  # the first run's sys.argv
    assert second.returncode == 2, second.stderr
    assert f"Another training run is using {out}: process {first.pid} on {socket.gethostname()}, started " \
        in second.stderr and f" as `{command}`" in second.stderr
    assert "tmux attach" in second.stderr and "Traceback" not in second.stderr
    assert first.poll() is None  # the running one is untouched
    # kill -9 leaves the lock file behind, but the kernel released the lock with the process.
    first.kill()
    first.wait()
    again = run_train(*args, "--epochs", 1)  # the killed run may be past epoch 1: then it is finished at once
    assert again.returncode == 0 and "Another training run" not in again.stderr, again.stderr
    assert "Resuming" in again.stdout or "This run is already finished" in again.stdout


def test_a_hang_up_saves_like_sigterm_and_the_rerun_is_bit_identical(digits_dir, tmp_path, uninterrupted):
    out = tmp_path / "run"
    args = ["--data-dir", digits_dir, "--output-dir", out, *ARGS]
    # A plain SSH session's hang-up reaches the whole process group, loader workers included.
    run = popen_train(*args)  # in a process group of its own, as every job the tests start
    wait_for_new_checkpoint(out, run, None)
    os.killpg(run.pid, signal.SIGHUP)
    stdout, stderr = run.communicate(timeout=60)
    assert run.returncode == 0, stderr[-3000:]
    assert "the terminal went away" in stdout and "Stopped by SIGHUP" in stdout
    rerun = run_train(*args)
    assert rerun.returncode == 0 and "Resuming" in rerun.stdout, rerun.stderr
    assert_same_run(out, uninterrupted)


def test_an_unwritable_output_folder_is_refused_before_any_work(digits_dir, tmp_path):
    out = tmp_path / "readonly"
    out.mkdir()
    with ExitStack() as stack:
        if os.geteuid() == 0:  # as root chmod stops nothing; a read-only mount does
            stack.enter_context(mounted("-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", target=out))
        else:
            out.chmod(0o500)
        result = run_train("--data-dir", digits_dir, "--output-dir", out, *FAST, "--epochs", 1)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"Cannot write in the output folder {out}" in result.stderr and "epoch 1" not in result.stdout


def train_with_step(digits_dir, out, body: str):
    """One FAST epoch, a sync point and a save every 5 steps, with engine.train_step(t, x, labels, lr,
    global_step) replaced by `body`, which may call the real one as train_step."""
    args = [str(a) for a in ("--data-dir", digits_dir, "--output-dir", out, *FAST, "--epochs", 1, "--log-every", 5,
                             "--checkpoint-minutes", "0.00001")]
    script = f"""
import sys, torch, engine, train
train_step = engine.train_step
def step(t, x, labels, lr, global_step):{body}
engine.train_step = step
sys.exit(train.main({args!r}))
"""
    return run_job([sys.executable, "-c", script], 300, cwd=REPO)


def test_a_non_finite_loss_stops_the_run_even_while_the_weights_stay_finite(digits_dir, tmp_path):
    """fp16's loss scaler skips the steps whose gradients overflow, so the loss can be inf while the weights stay
    finite: the loss check alone must stop the run, at the sync point that sees it, before its save."""
    out = tmp_path / "run"
    result = train_with_step(digits_dir, out, """
    loss, logits = train_step(t, x, labels, lr, global_step)
    return (torch.full_like(loss, float("inf")), logits) if global_step == 7 else (loss, logits)
""")
    assert result.returncode == 3, result.stderr
    assert "The training loss became non-finite in epoch 1 at step 10" in result.stdout
    assert "weights became non-finite" not in result.stdout
    state = load_latest_checkpoint(out)
    assert state["samples_done"] == 5 * 32
    assert all(t.isfinite().all() for t in state["model"].values() if t.is_floating_point())


def test_weights_made_non_finite_by_an_update_are_never_saved(digits_dir, tmp_path):
    """The loss of step 10 is finite, the update after it is not: the save due at that sync point refuses, and
    the checkpoint of step 5 stays the last one."""
    out = tmp_path / "run"
    result = train_with_step(digits_dir, out, """
    result = train_step(t, x, labels, lr, global_step)
    if global_step == 9:
        next(t.raw_model.parameters()).data.view(-1)[0] = float("nan")
    return result
""")
    assert result.returncode == 3, result.stderr
    assert "The weights became non-finite in epoch 1 at step 10, so they were not saved" in result.stdout
    state = load_latest_checkpoint(out)
    assert state["samples_done"] == 5 * 32
    assert all(t.isfinite().all() for t in state["model"].values() if t.is_floating_point())
