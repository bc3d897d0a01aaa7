"""evaluate.py reproduces what train.py logged, and answers bad input with one line and exit status 2."""

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import run_job
from inference_fixtures import DIGITS, ROOT, demo_checkpoint  # noqa: F401  (a fixture)

import evaluate
from checkpoint import read_checkpoint


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    code = evaluate.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_reproduces_logged_val_acc1(demo_checkpoint, capsys):  # noqa: F811
    # Same image size and precision (fp32 on the CPU) as training: the very same top-1, not just a close one.
    code, out, _ = run_main(capsys, "--checkpoint", demo_checkpoint, "--data-dir", DIGITS, "--json", "--workers", 0)
    assert code == 0
    result = json.loads(out)
    with open(demo_checkpoint.parent / "metrics.csv", newline="") as f:
        logged = list(csv.DictReader(f))[-1]
    history = read_checkpoint(demo_checkpoint)["history"][-1]
    assert abs(result["acc1"] - float(logged["val_acc1"])) <= 1e-6
    assert abs(result["acc1"] - history["val_acc1"]) <= 1e-6
    assert abs(result["acc5"] - history["val_acc5"]) <= 1e-6
    assert abs(result["loss"] - history["val_loss"]) <= 1e-5
    assert result["images"] == history["val_images"] == 360
    assert result["logged_val_acc1"] == history["val_acc1"]


def test_tta_flip_and_image_size(demo_checkpoint, capsys):  # noqa: F811
    code, out, _ = run_main(capsys, "--checkpoint", demo_checkpoint, "--data-dir", DIGITS, "--json", "--workers", 0,
                            "--tta-flip", "--image-size", 40, "--batch-size", 128)
    assert code == 0
    result = json.loads(out)
    assert result["tta_flip"] is True and result["image_size"] == 40 and result["images"] == 360
    assert 0 <= result["acc1"] <= result["acc5"] <= 100 and result["loss"] > 0
    assert result["logged_val_acc1"] is None  # another setting than training's: nothing to compare with


def test_command_line_text_report(demo_checkpoint):  # noqa: F811
    proc = subprocess.run([sys.executable, "evaluate.py", "--checkpoint", str(demo_checkpoint), "--workers", "0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "top-1" in proc.stdout and "top-5" in proc.stdout and "360 images" in proc.stdout


@pytest.mark.slow
def test_several_processes_count_every_image_once(demo_checkpoint):  # noqa: F811
    # Three CPU processes under torchrun (gloo): 360 images split 120 each, with a batch size that leaves
    # partial batches, and the totals still equal the single-process ones.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = run_job([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3",
                    "evaluate.py", "--checkpoint", str(demo_checkpoint), "--data-dir", str(DIGITS), "--json",
                    "--workers", "0", "--batch-size", "50"], 180, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 1, proc.stdout  # only rank 0 prints
    assert results[0]["processes"] == 3 and results[0]["images"] == 360
    assert abs(results[0]["acc1"] - read_checkpoint(demo_checkpoint)["history"][-1]["val_acc1"]) <= 1e-6


def test_bad_input_is_one_clear_message(demo_checkpoint, tmp_path, capsys):  # noqa: F811
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(os.urandom(1000))
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(demo_checkpoint.read_bytes()[:5000])
    other_classes = tmp_path / "other"
    shutil.copytree(DIGITS / "val" / "digit_0", other_classes / "val" / "cat")
    cases = {
        "No model file": ["--checkpoint", tmp_path / "missing.pth", "--data-dir", DIGITS],
        "is not a model file": ["--checkpoint", garbage, "--data-dir", DIGITS],
        "not a readable train.py checkpoint": ["--checkpoint", truncated, "--data-dir", DIGITS],
        "does not exist": ["--checkpoint", demo_checkpoint, "--data-dir", tmp_path / "nowhere"],
        "class folders": ["--checkpoint", demo_checkpoint, "--data-dir", other_classes],
    }
    for expected, argv in cases.items():
        code, out, err = run_main(capsys, *argv)
        assert code == 2, (expected, out, err)
        assert err.startswith("error: ") and expected in err and "Traceback" not in err
        assert out == ""
