"""Shared fixtures: real small image data and a helper that runs train.py the way a user does."""

import io
import os
import shutil
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


def train_cmd(*args) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), *map(str, args)]


def run_train(*args, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(train_cmd(*args), capture_output=True, text=True, timeout=timeout, env=env, **kwargs)


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
