"""One process of a DDP job fails where the others cannot see it: every process leaves promptly and the log
names the cause once. Two gloo processes under torchrun; the fault hits rank 0 only."""

import os
import re
import signal
import subprocess
import sys

import pytest
from conftest import FAST, REPO

# Run as each worker instead of train.py: injects the fault on rank 0, then runs train.py as torchrun would.
# gloo destroys a process group at once, which would hide a destroy on an error path; NCCL's destroy (torch 2.6
# and later) waits for every rank, so a barrier before it makes gloo wait the same way.
WORKER = """
import os, runpy, sys
sys.path.insert(0, {repo!r})
import torch.distributed as dist
import torch.utils.data

destroy = dist.destroy_process_group
def destroy_with_every_rank(group=None):
    dist.barrier()
    destroy(group)
dist.destroy_process_group = destroy_with_every_rank

if os.environ["RANK"] == "0":
{fault}
sys.argv[0] = {train!r}
runpy.run_path(sys.argv[0], run_name="__main__")
"""

# The first save, due at step 10, meets a full disk on rank 0 only.
FULL_DISK = """
    import errno
    def full_disk(event, args):
        if event == "open" and "checkpoint.pth.tmp-" in str(args[0]):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    sys.addaudithook(full_disk)
"""

# Rank 0's loader workers find the training data gone, before rank 0's first step; rank 1's still read it.
DATA_VANISHES = """
    import data
    isdir, decode_crop = os.path.isdir, data.decode_crop
    def gone(path):
        return torch.utils.data.get_worker_info() is not None and "/train/" in os.fsdecode(path)
    def vanished(path, *args):
        if gone(path):
            raise FileNotFoundError(2, "No such file or directory", os.fsdecode(path))
        return decode_crop(path, *args)
    data.decode_crop = vanished
    os.path.isdir = lambda path: not gone(path) and isdir(path)
"""


def kill_every_process_with(marker: bytes) -> None:
    """torchrun starts each worker in a session of its own: find them, and their loader workers, by a variable
    only this job's processes have in their environment."""
    for entry in os.scandir("/proc"):
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                if marker in f.read().split(b"\0"):
                    os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, ValueError):  # not a process, or one that ended while we looked
            continue


def run_job(tmp_path, fault: str, *args, timeout=120):
    """torchrun with two workers; the combined output and each rank's exit status from torchrun's summary. The
    timeout is the bound on "promptly": a job it kills, with all its processes, failed (left to themselves, the
    waiting ranks would sit out gloo's 30-minute timeout, or NCCL's watchdog)."""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER.format(repo=str(REPO), train=str(REPO / "train.py"), fault=fault))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker),
           *map(str, args)]
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env={**os.environ, "PYTHONUNBUFFERED": "1", "RANK_FAILURE_JOB": str(tmp_path)})
    try:
        output, _ = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_every_process_with(f"RANK_FAILURE_JOB={tmp_path}".encode())
        output, _ = job.communicate()
        pytest.fail(f"the job still ran after {timeout} s:\n{output[-3000:]}")
    statuses = {int(rank): int(code) for rank, code in
                re.findall(r"rank +: (\d+) \(local_rank: \d+\)\n +exitcode +: (-?\d+)", output)}
    return output, statuses


def assert_one_story(output: str, cause: str):
    assert output.count(cause) == 1, output[-4000:]
    # No rank's traceback (a broken gloo connection, a failed collective), and no save announced that never comes;
    # torchrun's own traceback of its ChildFailedError names no frame of train.py.
    assert 'train.py", line' not in output and "Connection closed" not in output, output[-4000:]
    assert "received: saving" not in output


@pytest.mark.slow
def test_a_failed_save_on_rank_0_takes_every_rank_out_at_that_sync_point(digits_dir, tmp_path):
    out = tmp_path / "run"
    output, statuses = run_job(tmp_path, FULL_DISK, "--data-dir", digits_dir, "--output-dir", out, *FAST,
                               "--epochs", 1, "--checkpoint-minutes", "0.00001")
    # Both leave through the vote, with rank 0's status: rank 1 neither waits for rank 0 nor loses it.
    assert statuses == {0: 2, 1: 2}, output[-4000:]
    assert_one_story(output, f"error: Could not save a checkpoint in {out}: [Errno 28] No space left on device")
    assert "10/22" in output  # it failed at step 10, not before training


@pytest.mark.slow
def test_rank_0_leaving_mid_step_is_not_held_by_a_collective_destroy(digits_dir, tmp_path):
    output, statuses = run_job(tmp_path, DATA_VANISHES, "--data-dir", digits_dir, "--output-dir",
                               tmp_path / "run", *FAST, "--epochs", 1)
    # Rank 1 waits in DDP's first collective and cannot vote: rank 0 leaves without a destroy that would wait
    # for it, and rank 1 follows quietly when its collective breaks (or torchrun stops it).
    assert statuses[0] == 2 and statuses[1] != 0, output[-4000:]
    assert_one_story(output, f"error: the training data in {digits_dir} disappeared during training")
