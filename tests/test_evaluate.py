"""evaluate.py reproduces what train.py logged, and answers bad input with one line and exit status 2."""

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import run_job
from inference_fixtures import DIGITS, ROOT, checkpoint_logits, demo_checkpoint, direct_scores  # noqa: F401

import evaluate
from checkpoint import read_checkpoint
from engine import evaluate_models


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


# ---------------------------------------------------------------------------------------- scores, computed directly

class LookUp(torch.nn.Module):
    """A 'network' whose logits are given: image i holds (i, its mirror's row) along its width, so flipping it
    horizontally reads the mirror's row of the table."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.tensor(table)

    def forward(self, x):
        return self.table[x[:, 0, 0, 0].long()]


class AsIs:
    device = torch.device("cpu")

    def __call__(self, images):
        return images


def test_top5_loss_and_flip_averaging_on_known_logits():
    # Seven classes. Image 0's label ranks 5th (in top-5, not in top-4), image 1's 6th, image 2's 1st, image 3's
    # 2nd; image 4 is unreadable (label -1) and counts nowhere. Mirrors (rows 5-9) move image 1's label to the top.
    originals = [[9, 8, 7, 6, 5, 4, 0], [9, 8, 7, 6, 5, 0, 4], [0, 5, 1, 2, 3, 4, 1], [1, 6, 5, 0, 0, 0, 0],
                 [0, 0, 0, 0, 0, 0, 0]]
    mirrors = [[9, 8, 7, 6, 5, 4.5, 0], [0, 0, 0, 0, 0, 30, 0], [5, 0, 0, 0, 0, 0, 0], [1, 2, 3, 4, 5, 6, 7],
               [0, 0, 0, 0, 0, 0, 0]]
    labels = [4, 5, 1, 2, -1]
    model = LookUp([[v + 0.01 * k for k, v in enumerate(row)] for row in originals + mirrors])  # no ties
    table = model.table.tolist()
    images = torch.tensor([[[[i, i + 5]]] for i in range(5)], dtype=torch.float32)  # N, C, H, W = 5, 1, 1, 2
    batches = [(images[:3], torch.tensor(labels[:3]), []), (images[3:], torch.tensor(labels[3:]), ["unreadable"])]
    good = [i for i, y in enumerate(labels) if y >= 0]
    for flip in (False, True):
        rows = [[(a + b) / 2 for a, b in zip(table[i], table[i + 5], strict=True)] if flip else table[i] for i in good]
        expected = direct_scores(rows, [labels[i] for i in good])
        [result] = evaluate_models([model], batches, AsIs(), None, flip=flip)
        assert result.pop("val_skipped") == 1
        assert result == pytest.approx(expected, rel=1e-6), flip
    assert direct_scores([table[i] for i in good], [labels[i] for i in good])["val_acc5"] == 75.0


def test_evaluate_py_scores_and_flip_averaging_against_a_direct_computation(demo_checkpoint, capsys):  # noqa: F811
    logits, mirrored, labels = checkpoint_logits(demo_checkpoint)
    results = {}
    for flip in (False, True):
        code, out, err = run_main(capsys, "--checkpoint", demo_checkpoint, "--data-dir", DIGITS, "--json",
                                  "--workers", 0, "--tta-flip" if flip else "--no-tta-flip")
        assert code == 0, err
        result = json.loads(out)
        expected = direct_scores((logits + mirrored) / 2 if flip else logits, labels)
        assert result["tta_flip"] is flip and result["images"] == expected["val_images"] == 360
        assert result["acc1"] == pytest.approx(expected["val_acc1"], abs=1e-9)
        assert result["acc5"] == pytest.approx(expected["val_acc5"], abs=1e-9)
        assert result["loss"] == pytest.approx(expected["val_loss"], rel=1e-5)
        results[flip] = result
    assert results[True]["loss"] != pytest.approx(results[False]["loss"], rel=1e-3)  # the flip changes the scores


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
