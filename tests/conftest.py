"""Shared fixtures: real small image data and a helper that runs train.py the way a user does."""

import io
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from sklearn.datasets import load_sample_image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data import make_demo_dataset  # noqa: E402

# Small, fast settings on the digits data: a few seconds per epoch on two CPU cores. The recipes count --lr per
# 256 images of global batch: 1.6 is a peak of 0.2 at batch 32. One compute thread, as the measurement a new
# run makes would choose here, but without its second of start-up and the same on every machine.
FAST = ["--arch", "resnet14_tiny", "--image-size", "32", "--batch-size", "32", "--min-crop-scale", "0.35",
        "--lr", "1.6", "--workers", "1", "--threads", "1", "--device", "cpu"]


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """scikit-learn's 1,797 real handwritten digits as JPEG class folders (1,437 train / 360 val)."""
    return make_demo_dataset(tmp_path_factory.mktemp("data") / "digits")


@pytest.fixture(scope="session")
def odd_digits_dir(digits_dir, tmp_path_factory) -> Path:
    """The digits with one val image removed: 359 val images, odd for any world size above 1."""
    root = tmp_path_factory.mktemp("data") / "odd_digits"
    shutil.copytree(digits_dir, root)
    next((root / "val" / "digit_0").iterdir()).unlink()
    return root


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


@pytest.fixture(scope="session")
def one_epoch(digits_dir, tmp_path_factory) -> Path:
    """A run folder holding a finished first epoch (FAST settings), copied by each test that continues it."""
    out = tmp_path_factory.mktemp("one_epoch")
    result = run_train("--data-dir", digits_dir, "--output-dir", out, *FAST, "--epochs", 1)
    assert result.returncode == 0, result.stderr
    return out


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
