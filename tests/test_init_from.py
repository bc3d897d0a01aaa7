"""--init-from: a new run from a checkpoint's weights, and the files it refuses before any work."""

import csv

import pytest
import torch
from conftest import FAST, run_train

import train
from checkpoint import LATEST
from config import Config, UsageError, resumed_config


def rows(out):
    with open(out / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_a_new_run_starts_from_the_weights_with_a_fresh_optimizer_and_schedule(digits_dir, one_epoch, tmp_path):
    """The new run's first epoch trains a network that already knows the digits (far above the first epoch of
    the run it came from), counts its epochs from one, and a rerun of the same command resumes it."""
    out = tmp_path / "tuned"
    args = ["--data-dir", digits_dir, "--output-dir", out, *FAST, "--epochs", "1", "--optimizer", "adamw", "--lr",
            "0.004", "--lr-reference-batch", "0", "--no-tensorboard", "--init-from", one_epoch / LATEST]
    done = run_train(*args)
    assert done.returncode == 0, done.stderr
    assert f"Starting a new run from the weights in {one_epoch / LATEST}: fresh adamw optimizer" in done.stdout
    [before], [after] = rows(one_epoch), rows(out)
    assert after["epoch"] == "1" and float(after["train_acc1"]) > float(before["train_acc1"]) + 10
    state = torch.load(out / LATEST, weights_only=True)
    assert state["config"]["init_from"] == str(one_epoch / LATEST) and state["config"]["optimizer"] == "adamw"
    again = run_train(*args)
    assert again.returncode == 0 and "already finished" in again.stdout and "Starting a new run" not in again.stdout


def text_file(one_epoch, tmp_path):
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    return tmp_path / "notes.pth"


def other_classes(one_epoch, tmp_path):
    state = torch.load(one_epoch / LATEST, weights_only=True)
    state["class_names"] = state["class_names"][:3]
    torch.save(state, tmp_path / "three_classes.pth")
    return tmp_path / "three_classes.pth"


@pytest.mark.parametrize("make_file, extra, message", [
    (lambda one_epoch, tmp: tmp / "missing.pth", [], "there is no such file"),
    (text_file, [], "is not a readable train.py checkpoint"),
    (other_classes, [], "classifies 3 classes, but"),
    (lambda one_epoch, tmp: one_epoch / LATEST, ["--arch", "resnet26_narrow"],
     "holds a resnet14_tiny, not a resnet26_narrow"),
])
def test_unusable_files_are_refused_in_one_paragraph_before_any_work(digits_dir, one_epoch, tmp_path, make_file,
                                                                     extra, message, capsys):
    out = tmp_path / "never"
    code = train.main(["--data-dir", str(digits_dir), "--output-dir", str(out), *FAST, *extra, "--init-from",
                       str(make_file(one_epoch, tmp_path))])
    assert code == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: --init-from") and message in errors[0], errors
    assert not out.exists()


def test_a_run_is_never_reinitialized_from_another_file():
    saved = vars(Config(init_from="a.pth"))
    assert resumed_config(Config(), saved, set()).init_from == "a.pth"
    with pytest.raises(UsageError, match="started from a.pth; --init-from b.pth starts a new run"):
        resumed_config(Config(init_from="b.pth"), saved, {"init_from"})
    with pytest.raises(UsageError, match="started from random weights"):
        resumed_config(Config(init_from="b.pth"), vars(Config()), {"init_from"})


def test_a_checkpoint_from_before_optimizer_and_init_from_resumes_as_the_sgd_run_it_is(digits_dir, one_epoch,
                                                                                    tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    state = torch.load(one_epoch / LATEST, weights_only=True)
    for newer in ("optimizer", "lr_scaling", "init_from"):
        del state["config"][newer]
    torch.save(state, out / LATEST)
    done = run_train("--data-dir", digits_dir, "--output-dir", out, *FAST, "--epochs", "2", "--no-tensorboard")
    assert done.returncode == 0 and "Resuming" in done.stdout, done.stderr
    assert "epochs: 1 -> 2" in done.stdout  # the one setting that changed, and no other announced
    assert not any(f"  {newer}:" in done.stdout for newer in ("optimizer", "lr_scaling", "init_from")), done.stdout
    assert torch.load(out / LATEST, weights_only=True)["config"]["optimizer"] == "sgd"
