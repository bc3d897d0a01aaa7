"""benchmark.py's interface, which other tools parse: each subcommand runs on the CPU at small sizes and, with
--json, prints one JSON object per measurement."""

import json
import shutil
import subprocess
import sys

import pytest
from conftest import REPO
from PIL import Image


def benchmark(*args, timeout=300) -> list[dict]:
    result = subprocess.run([sys.executable, "benchmark.py", *map(str, args), "--json"], cwd=REPO,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert rows[0]["what"] == "environment" and rows[0]["torch"]
    return rows[1:]


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    [row] = benchmark("make-data", "--out", out, "--images", 16, "--classes", 2)
    assert row["images"] == 16 + 2 and 50 < row["mean_kb"] < 200  # ImageNet's JPEGs average about 110 KB
    return out


def test_make_data_writes_imagenet_like_jpegs_in_class_folders(bench_dir):
    files = sorted(bench_dir.glob("*/*/*.JPEG"))
    assert {(f.parts[-3], f.parts[-2]) for f in files} == {(s, f"n{c:08d}") for s in ("train", "val") for c in (0, 1)}
    sizes = set()
    for f in files:
        with Image.open(f) as img:
            assert img.format == "JPEG" and img.mode == "RGB"
            sizes.add(img.size)
    assert {(500, 375), (375, 500)} & sizes


def test_loader_compares_the_project_pipeline_with_torchvisions_on_the_same_files(bench_dir, tmp_path):
    train_only = tmp_path / "train_only"  # the loader benchmark reads train/ alone
    shutil.copytree(bench_dir / "train", train_only / "train")
    rows = benchmark("loader", "--data-dir", train_only, "--workers", 1, "--seconds", 1, "--batch-size", 4,
                     "--image-size", 64)
    assert [r["pipeline"] for r in rows] == ["project", "torchvision"]
    assert all(r["what"] == "loader" and r["workers"] == 1 and r["img_s"] > 0 for r in rows)


def test_compute_measures_both_models_with_the_same_settings():
    rows = benchmark("compute", "--batch-size", 2, "--image-size", 32, "--steps", 2, "--warmup", 1,
                     "--precision", "fp32")
    assert [r["model"] for r in rows] == ["project", "torchvision"]
    assert all(r["img_s"] > 0 and r["ms_step"] == pytest.approx(1000 * 2 / r["img_s"], rel=0.01) for r in rows)


def test_train_runs_train_pys_loop_and_relates_it_to_compute_only(bench_dir):
    [row] = benchmark("train", "--data-dir", bench_dir, "--steps", 2, "--batch-size", 4, "--image-size", 32,
                      "--workers", 1, "--warmup", 1, "--compute-steps", 2)
    assert row["what"] == "train" and row["steps"] == 4 and row["decode"] == "cpu"  # 16 images: 4 steps an epoch
    # compute_only_img_s is reported rounded to 0.1 img/s, and these CPU rates are small
    assert row["ratio"] == pytest.approx(row["img_s"] / row["compute_only_img_s"], rel=0.01)
    assert 0 <= row["data_wait_pct"] < 100
    refused = subprocess.run([sys.executable, "benchmark.py", "train", "--data-dir", bench_dir, "--decode", "gpu",
                              "--gpu-decode-share", "0.5,2"], cwd=REPO, capture_output=True, text=True)
    assert refused.returncode == 2 and "fractions from 0 to 1" in refused.stderr
    no_val = subprocess.run([sys.executable, "benchmark.py", "train", "--data-dir", bench_dir / "train"], cwd=REPO,
                            capture_output=True, text=True)
    assert no_val.returncode == 2 and "has no train/ folder" in no_val.stderr and "Traceback" not in no_val.stderr
