"""Shared fixtures: real small image data and a helper that runs train.py the way a user does."""

import fcntl
import io
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data import make_demo_dataset  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Each test process computes on one core: torch's threads spin while they wait for each other, and with the
    # other test processes busy on the remaining cores a step takes many times longer than on one thread.
    torch.set_num_threads(1)

# Small, fast settings on the digits data: a few seconds per epoch on two CPU cores. The recipes count --lr per
# 256 images of global batch: 1.6 is a peak of 0.2 at batch 32. One compute thread, as the measurement a new
# run makes would choose here, but without its second of start-up and the same on every machine.
FAST = ["--arch", "resnet14_tiny", "--image-size", "32", "--batch-size", "32", "--min-crop-scale", "0.35",
        "--lr", "1.6", "--workers", "1", "--threads", "1", "--device", "cpu"]


def built_once(tmp_path_factory, name: str, build) -> Path:
    """A folder that build(folder) fills once per test session and every test process then reads: the suite runs
    in several processes (pytest-xdist), which share the session's temporary folder above their own."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    folder, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the others wait here while the first builds
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # a build that failed in another process
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """scikit-learn's 1,797 real handwritten digits as JPEG class folders (1,437 train / 360 val)."""
    return built_once(tmp_path_factory, "digits", make_demo_dataset)


@pytest.fixture(scope="session")
def odd_digits_dir(digits_dir, tmp_path_factory) -> Path:
    """The digits with one val image removed: 359 val images, odd for any world size above 1."""
    def build(root):
        shutil.copytree(digits_dir, root, dirs_exist_ok=True)
        next((root / "val" / "digit_0").iterdir()).unlink()
    return built_once(tmp_path_factory, "odd_digits", build)


# ---------------------------------------------------------------------------------------------------- jobs
# A run is a process group: train.py and its loader workers, or torchrun and its ranks. Each job the tests start
# gets a group of its own, and the whole group is killed when the test is over or a wait for it times out, so a
# hung or failed test leaves no spinning ranks or workers behind.

_jobs: list[subprocess.Popen] = []


def start_job(cmd: list[str], **kwargs) -> subprocess.Popen:
    """subprocess.Popen in a new process group (the session's), killed as a whole when the test ends."""
    kwargs.setdefault("env", {**os.environ, "PYTHONUNBUFFERED": "1"})
    proc = subprocess.Popen(cmd, start_new_session=True, **kwargs)
    _jobs.append(proc)
    return proc


def kill_job(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # the group has ended: its leader and every worker
        pass
    proc.communicate()


def run_job(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run(capture_output=True, text=True) for a job: on a timeout its whole group is killed."""
    proc = start_job(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_job(proc)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


@pytest.fixture(autouse=True)
def _kill_jobs_left_running():
    yield
    while _jobs:
        kill_job(_jobs.pop())  # also the loader workers a run killed on purpose left behind


def train_cmd(*args) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), *map(str, args)]


def run_train(*args, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    return run_job(train_cmd(*args), timeout, **kwargs)


def train_into(digits_dir, *args):
    """build for built_once: a train.py run on the digits into the folder."""
    def build(out):
        result = run_train("--data-dir", digits_dir, "--output-dir", out, *args)
        assert result.returncode == 0, result.stderr
    return build


@pytest.fixture(scope="session")
def one_epoch(digits_dir, tmp_path_factory) -> Path:
    """A run folder holding a finished first epoch (FAST settings), copied by each test that continues it."""
    return built_once(tmp_path_factory, "one_epoch", train_into(digits_dir, *FAST, "--epochs", 1))


@pytest.fixture(scope="session")
def two_epochs(digits_dir, tmp_path_factory) -> Path:
    """A finished 2-epoch run (FAST settings): checkpoint.pth holds epoch 2, checkpoint_prev.pth epoch 1."""
    return built_once(tmp_path_factory, "two_epochs", train_into(digits_dir, *FAST, "--epochs", 2))


# Save at every sync point (every 3 steps) so kills land mid-epoch; the same flags for every run compared.
# The fast recipe's pieces (a warm-up schedule, no decay on 1-D parameters, label smoothing, flip TTA) and the
# weight average are on, so their state is covered too.
ARGS = [*FAST, "--epochs", "2", "--checkpoint-minutes", "0.0001", "--log-every", "3", "--schedule", "linear",
        "--warmup-epochs", "0.5", "--no-bias-decay", "--label-smoothing", "0.1", "--eval-flip", "--ema-decay", "0.95"]


@pytest.fixture(scope="session")
def uninterrupted(digits_dir, tmp_path_factory) -> Path:
    """A run with ARGS never interrupted: what every interrupted and resumed run with ARGS must end as, bit for bit."""
    return built_once(tmp_path_factory, "uninterrupted", train_into(digits_dir, *ARGS))


def add_odd_images(folder):
    """The files real ImageNet holds besides good JPEGs: three decode, three are broken."""
    photo = Image.fromarray(load_sample_image("flower.jpg")).resize((40, 30))
    photo.save(folder / "odd_a_png.JPEG", format="PNG")
    photo.convert("CMYK").save(folder / "odd_b_cmyk.JPEG")
    photo.convert("L").save(folder / "odd_c_gray.JPEG")
    buf = io.BytesIO()
    photo.save(buf, format="JPEG")
    (folder / "odd_d_truncated.JPEG").write_bytes(buf.getvalue()[:300])
    (folder / "odd_e_empty.JPEG").write_bytes(b"")
    (folder / "odd_f_text.JPEG").write_text("not an image")
    return ["odd_d_truncated.JPEG", "odd_e_empty.JPEG", "odd_f_text.JPEG"]
