import csv
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch
from conftest import FAST, REPO, run_job, run_train

from checkpoint import LATEST, PREVIOUS
from config import parse_config
from engine import LoaderWait
from outputs import data_wait_advice
from recipes import onecycle_lr


def read_metrics(out):
    with open(out / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_onecycle_lr_equals_torch_onecyclelr():
    for total, pct in ((100, 0.3), (37, 0.25), (1000, 0.5)):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.175, total_steps=total, pct_start=pct,
                                                    div_factor=25, final_div_factor=1e4, cycle_momentum=False)
        for step in range(total):
            expected = opt.param_groups[0]["lr"]
            assert onecycle_lr(step, total, 0.175, pct, 25, 1e4) == pytest.approx(expected, rel=1e-12, abs=1e-15)
            opt.step()
            sched.step()


def test_defaults_are_the_original_recipe_and_demo_only_fills_unset_flags():
    cfg = parse_config([])
    assert (cfg.batch_size, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.epochs, cfg.image_size, cfg.arch) == \
        (256, 0.175, 0.9, 1e-4, 50, 224, "resnet50")
    assert cfg.lr_reference_batch == 256  # 0.175 belongs to a global batch of 256 images
    demo = parse_config(["--demo", "--epochs", "3"])
    assert demo.epochs == 3 and demo.image_size == 32 and demo.data_dir.endswith("digits")


@pytest.mark.parametrize("flags, message", [(["--epochs", "0"], "--epochs must be positive"),
                                            (["--lr", "-1"], "--lr must be positive"),
                                            (["--device", "tpu"], "invalid choice: 'tpu'"),
                                            (["--min-crop-scale", "2"], "--min-crop-scale must be in (0, 1]"),
                                            (["--gpu-decode-share", "1.5"], "--gpu-decode-share must be in [0, 1]"),
                                            (["--lr", "nan"], "--lr must be a finite number, not nan"),
                                            (["--lr", "inf"], "--lr must be a finite number, not inf"),
                                            (["--image-size", "7"], "must be at least 32 pixels"),
                                            (["--eval-image-size", "16"], "must be at least 32 pixels"),
                                            (["--workers", "-5"], "--workers must be -1")])
def test_bad_flags_are_refused_with_a_message(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(flags)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_a_bad_flag_exits_2_with_one_error_and_no_traceback():
    result = run_train("--epochs", "0")
    assert result.returncode == 2
    assert "error: --epochs must be positive" in result.stderr and "Traceback" not in result.stderr


def test_a_short_run_learns_and_writes_every_artifact(digits_dir, tmp_path):
    out = tmp_path / "run"
    result = run_train("--data-dir", digits_dir, "--output-dir", out, "--epochs", 4, *FAST)
    assert result.returncode == 0, result.stderr
    rows = read_metrics(out)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert float(rows[-1]["val_acc1"]) > 50 > float(rows[0]["val_acc1"])  # 10 classes: chance is 10%
    assert all(int(r["val_images"]) == 360 and int(r["train_images"]) == 1437 // 32 * 32 for r in rows)
    assert (out / "training_curves.png").stat().st_size > 10_000
    assert all(0 <= float(r["data_wait_pct"]) < 100 for r in rows)
    assert result.stdout.count("% of the time") == 4

    state = torch.load(out / LATEST, map_location="cpu", weights_only=True)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in state["model"])
    assert state["epoch"] == 4 and state["samples_done"] == 0 and state["config"]["epochs"] == 4
    assert state["class_names"] == [f"digit_{i}" for i in range(10)]
    assert {"optimizer", "grad_scaler", "history"} <= state.keys()
    assert torch.load(out / PREVIOUS, map_location="cpu", weights_only=True)["epoch"] == 3

    again = run_train("--data-dir", digits_dir, "--output-dir", out, "--epochs", 4, *FAST)
    assert again.returncode == 0 and "already finished" in again.stdout
    assert len(read_metrics(out)) == 4


def test_bad_data_layout_is_refused_before_any_work(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG").write_bytes(b"x")
    result = run_train("--data-dir", tmp_path, "--output-dir", tmp_path / "out", "--device", "cpu")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "instead of class folders" in result.stderr and "prepare_imagenet.py" in result.stderr
    assert not (tmp_path / "out").exists()


def test_corrupt_checkpoints_fall_back_then_refuse_then_move_aside(digits_dir, two_epochs, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(two_epochs, out)
    args = ["--data-dir", digits_dir, "--output-dir", out, *FAST]
    (out / LATEST).write_bytes((out / LATEST).read_bytes()[:1000])  # truncated, as by a full disk
    result = run_train(*args, "--epochs", 3)
    assert result.returncode == 0, result.stderr
    assert "unreadable" in result.stdout and "older checkpoint" in result.stdout
    assert [int(r["epoch"]) for r in read_metrics(out)] == [1, 2, 3]  # epoch 2 redone, not duplicated

    (out / LATEST).write_bytes(b"garbage")
    (out / PREVIOUS).write_bytes(b"")
    refused = run_train(*args, "--epochs", 4)
    assert refused.returncode == 2 and "Refusing to start over" in refused.stderr
    assert (out / LATEST).read_bytes() == b"garbage"  # nothing was overwritten

    fresh = run_train(*args, "--epochs", 1, "--no-resume")
    assert fresh.returncode == 0, fresh.stderr
    archived = [p for p in out.iterdir() if p.name.startswith("previous-")]
    assert len(archived) == 1 and (archived[0] / LATEST).read_bytes() == b"garbage"
    # The checkpoint moved aside by the first fallback goes with the run it belongs to.
    assert len(list(archived[0].glob(f"{LATEST}.unreadable-*"))) == 1 and not list(out.glob("*.unreadable-*"))
    assert [int(r["epoch"]) for r in read_metrics(out)] == [1]


def test_changed_settings_on_resume_are_announced_and_applied(digits_dir, one_epoch, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(one_epoch, out)
    args = ["--data-dir", digits_dir, "--output-dir", out, *FAST]
    state = torch.load(out / LATEST, map_location="cpu", weights_only=True)
    del state["config"]["sync_check_steps"]  # as saved before the setting existed
    torch.save(state, out / LATEST)
    result = run_train(*args, "--epochs", 2, "--lr", "0.1", "--batch-size", "48")
    assert result.returncode == 0, result.stderr
    for line in ("epochs: 1 -> 2", "lr: 1.6 -> 0.1", "batch_size: 32 -> 48", "LR schedule is recomputed"):
        assert line in result.stdout
    assert "sync_check_steps" not in result.stdout  # a setting newer than the run changed nothing
    state = torch.load(out / LATEST, map_location="cpu", weights_only=True)
    assert state["config"]["lr"] == 0.1 and state["epoch"] == 2
    wrong_arch = run_train(*args, "--epochs", 3, "--arch", "resnet26_narrow")
    assert wrong_arch.returncode == 2 and "--arch resnet14_tiny" in wrong_arch.stderr


def test_a_new_momentum_weight_decay_and_no_bias_decay_reach_the_optimizer_on_resume(digits_dir, one_epoch, tmp_path):
    """The checkpoint's optimizer carries the old values in its parameter groups; the new ones must replace them."""
    out = tmp_path / "run"
    shutil.copytree(one_epoch, out)
    result = run_train("--data-dir", digits_dir, "--output-dir", out, *FAST, "--epochs", 2, "--momentum", 0.8,
                       "--weight-decay", 5e-4, "--no-bias-decay")
    assert result.returncode == 0, result.stderr
    for line in ("momentum: 0.9 -> 0.8", "weight_decay: 0.0001 -> 0.0005", "bias_decay: True -> False"):
        assert line in result.stdout
    state = torch.load(out / LATEST, map_location="cpu", weights_only=True)
    # How many parameters are 1-D (biases, BatchNorm) is read off the saved weights: that many get no decay.
    dims = [tensor.dim() for name, tensor in state["model"].items()
            if not name.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    vectors = sum(d == 1 for d in dims)
    groups = state["optimizer"]["param_groups"]
    assert [group["momentum"] for group in groups] == [0.8, 0.8]
    assert sorted((len(g["params"]), g["weight_decay"]) for g in groups) == \
        sorted([(len(dims) - vectors, 5e-4), (vectors, 0.0)])


def test_a_resume_on_a_dataset_with_other_classes_is_refused_with_the_flags_to_pass(digits_dir, one_epoch, tmp_path):
    """Ten classes again, one of them another: the weights would load, and train the wrong labels."""
    data = tmp_path / "other"
    for split in ("train", "val"):
        for label in range(10):
            name = "letter_a" if label == 9 else f"digit_{label}"
            shutil.copytree(digits_dir / split / f"digit_{label}", data / split / name)
    out = tmp_path / "run"
    shutil.copytree(one_epoch, out)
    before = (out / LATEST).read_bytes()
    result = run_train("--data-dir", data, "--output-dir", out, *FAST, "--epochs", 2)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"The checkpoint in {out} was trained on 10 other classes than the 10 in {data}" in result.stderr
    assert "Use another --output-dir for this dataset, or --no-resume to start over here" in result.stderr
    assert (out / LATEST).read_bytes() == before and "epoch 2/2" not in result.stdout


def test_a_bare_rerun_continues_with_the_settings_the_run_started_with(digits_dir, tmp_path):
    out = tmp_path / "run"
    # --recipe fast, fitted to 32 px digits and one epoch.
    started = ["--recipe", "fast", "--start-image-size", 16, "--eval-image-size", 0, "--warmup-epochs", 0.5]
    assert run_train("--data-dir", digits_dir, "--output-dir", out, *FAST, *started, "--epochs", 1).returncode == 0
    # Only where the data and the run are, this machine's settings, and one deliberate change.
    result = run_train("--data-dir", digits_dir, "--output-dir", out, "--workers", 1, "--device", "cpu",
                       "--epochs", 2)
    assert result.returncode == 0, result.stderr
    assert "epochs: 1 -> 2" in result.stdout and "schedule:" not in result.stdout and "arch:" not in result.stdout
    config = torch.load(out / LATEST, map_location="cpu", weights_only=True)["config"]
    assert (config["recipe"], config["arch"], config["image_size"], config["start_image_size"], config["lr"],
            config["schedule"], config["label_smoothing"], config["bias_decay"], config["epochs"]) == \
        ("fast", "resnet14_tiny", 32, 16, 1.6, "linear", 0.1, False, 2)
    # A recipe given now brings back its presets and the defaults for what the old one had set, announced.
    seed = run_train("--data-dir", digits_dir, "--output-dir", out, *FAST, "--epochs", 3, "--recipe", "seed")
    assert seed.returncode == 0, seed.stderr
    assert "recipe: fast -> seed" in seed.stdout and "schedule: linear -> onecycle" in seed.stdout
    assert torch.load(out / LATEST, map_location="cpu", weights_only=True)["config"]["label_smoothing"] == 0


def test_progressive_resizing_eval_size_and_cost_reach_the_run_and_its_outputs(digits_dir, tmp_path):
    out = tmp_path / "run"
    result = run_train("--data-dir", digits_dir, "--output-dir", out, *FAST, "--epochs", 3,
                       "--start-image-size", 16, "--eval-image-size", 48, "--usd-per-hour", 32.77)
    assert result.returncode == 0, result.stderr
    assert [int(r["image_size"]) for r in read_metrics(out)] == [16, 32, 32]
    assert "epoch 1/3 16px" in result.stdout and "epoch 3/3 32px" in result.stdout
    rows = read_metrics(out)
    hours = sum(float(r["epoch_seconds"]) + float(r["val_seconds"]) for r in rows) / 3600
    assert f"${32.77 * hours:,.2f} spent, about ${32.77 * hours:,.2f} for the run (projected)" in result.stdout
    assert torch.load(out / LATEST, map_location="cpu", weights_only=True)["config"]["eval_image_size"] == 48


def test_metrics_csv_keeps_history_never_duplicates_and_leaves_no_partial_file(tmp_path):
    from outputs import METRIC_COLUMNS, append_metrics

    path = tmp_path / "metrics.csv"
    row = {column: 0 for column in METRIC_COLUMNS}
    append_metrics(path, [{**row, "epoch": 1, "val_acc1": 10.5}])
    append_metrics(path, [{**row, "epoch": 1, "val_acc1": 99.0}, {**row, "epoch": 2, "val_acc1": 20.5}])
    rows = read_metrics(path.parent)
    assert [(r["epoch"], r["val_acc1"]) for r in rows] == [("1", "10.5"), ("2", "20.5")]  # the first epoch 1 stays
    assert list(rows[0]) == METRIC_COLUMNS and [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]


def test_time_spent_waiting_for_the_loader_is_measured_and_explained():
    def slow_loader(delay):
        for item in range(5):
            time.sleep(delay)
            yield item

    waiting = LoaderWait(slow_loader(0.05))
    assert list(waiting) == [0, 1, 2, 3, 4] and 0.25 <= waiting.seconds < 0.5
    waiting = LoaderWait(slow_loader(0.0))
    for _ in waiting:
        time.sleep(0.05)  # the training step: the loader is never the one holding things up
    assert waiting.seconds < 0.05

    assert data_wait_advice(0.09, "cpu", 1.0, "cuda", 15) == data_wait_advice(0.01, "cpu", 1.0, "cuda", 15) == ""
    assert data_wait_advice(0.01, "gpu", 0.0, "cuda", 15) == data_wait_advice(0.05, "gpu", 0.5, "cuda", 15) == ""
    assert "a --gpu-decode-share below 0.5 may leave" in data_wait_advice(0.01, "gpu", 0.5, "cuda", 15)
    assert "try --decode gpu" in data_wait_advice(0.3, "cpu", 1.0, "cuda", 15)
    assert "raise --gpu-decode-share above 0.25" in data_wait_advice(0.3, "gpu", 0.25, "cuda", 15)
    assert "more --workers than 15" in data_wait_advice(0.3, "gpu", 1.0, "cuda", 15)
    assert "more --workers than 1" in data_wait_advice(0.3, "cpu", 1.0, "cpu", 1)


def test_a_run_saved_without_loss_scaling_resumes_where_fp16_scales_the_loss(digits_dir):
    """bf16 and fp32 runs save their disabled GradScaler as {}; a resume in fp16 (a T4 or V100, where
    --precision auto means fp16) starts a fresh scaler instead of failing."""
    from engine import build_data, build_model, build_training
    from runtime import Runtime
    from train import Run, StopRequest, checkpoint_state, resume

    cfg = parse_config(["--data-dir", str(digits_dir), *map(str, FAST)])
    rt = Runtime()

    def new_run():
        return Run(cfg, [f"digit_{i}" for i in range(10)], rt, build_training(build_model(cfg, 10), cfg, rt),
                   build_data(cfg, [f"digit_{i}" for i in range(10)], rt, 0, with_val=False), StopRequest(rt))

    saved = checkpoint_state(new_run(), torch.zeros(5, dtype=torch.float64), 0.0)
    assert saved["grad_scaler"] == {}
    fp16 = new_run()
    fp16.training.scaler = torch.amp.GradScaler("cpu", enabled=True)
    resume(fp16, saved)
    assert fp16.training.scaler.get_scale() == torch.amp.GradScaler("cpu").get_scale()


def test_the_step_loop_copies_nothing_from_the_host_between_sync_points(digits_dir, tmp_path):
    """Every tensor train.py makes on the device from host values waits for a copy from pageable memory;
    only the sync points (every --log-every steps) may make them."""
    wrapper = f"""
import sys, traceback, torch, train
made = [0]
tensor = torch.tensor
def counting(*args, **kwargs):
    made[0] += "device" in kwargs and traceback.extract_stack()[-2].filename == train.__file__
    return tensor(*args, **kwargs)
train.torch.tensor = counting
code = train.main({[str(a) for a in ("--data-dir", digits_dir, "--output-dir", tmp_path, *FAST, "--epochs", 1,
                                       "--log-every", 11)]!r})
print(f"tensors made on the device: {{made[0]}}")
sys.exit(code)
"""
    result = run_job([sys.executable, "-c", wrapper], 300, cwd=REPO)
    assert result.returncode == 0, result.stderr
    # 44 steps: 4 sync points, and the stop vote after the epoch.
    assert int(result.stdout.rsplit("tensors made on the device: ", 1)[1]) == 5


def test_compute_threads_follow_what_limits_the_run():
    from engine import threads_for

    # ResNet-50 at 32 px with 2 workers on 2 cores: both cores compute faster, workers and all.
    assert threads_for(3.0, 1.9, cores=2, workers=2) == 2
    # The demo: a second thread that shares the worker's core spins and loses.
    assert threads_for(0.04, 0.4, cores=2, workers=1) == 1
    assert threads_for(1.0, 0.9, cores=16, workers=4) == 12  # too small a gain to give up the workers' cores


def test_a_new_run_measures_its_compute_threads_and_a_resume_keeps_them(digits_dir, tmp_path):
    """Both forecast an epoch, as a CPU run on ImageNet would: here the digits count as large data."""
    out = tmp_path / "run"
    at = FAST.index("--threads")
    args = ["--data-dir", digits_dir, "--output-dir", out, *FAST[:at], *FAST[at + 2:]]  # the default: measured

    def run_on_large_data(*more):
        wrapper = ("import sys, train; train.CPU_FORECAST_ABOVE_IMAGES = 1000; "
                   f"sys.exit(train.main({[str(a) for a in (*args, *more)]!r}))")
        result = subprocess.run([sys.executable, "-c", wrapper], cwd=REPO, capture_output=True, text=True,
                                timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert result.returncode == 0, result.stderr
        forecasts = re.findall(r"\*\*\* On the CPU an epoch takes about \d+ s \(44 steps of \d+\.\d\d s, measured "
                               r"just now\); 1 epoch to go: about \d+ s\. Stop with Ctrl-C .*\*\*\*\n", result.stdout)
        assert len(forecasts) == 1, result.stdout
        assert result.stdout.index(forecasts[0]) < result.stdout.index("\nTraining ")  # before the first step
        return result

    first = run_on_large_data("--epochs", 1)
    threads = torch.load(out / LATEST, map_location="cpu", weights_only=True)["config"]["threads"]
    assert f"Compute threads: {threads} (a step took " in first.stdout and threads in (1, 2)
    again = run_on_large_data("--epochs", 2)  # no thread measurement to reuse: the forecast measures its own steps
    assert "Compute threads" not in again.stdout
    assert torch.load(out / LATEST, map_location="cpu", weights_only=True)["config"]["threads"] == threads
