"""--compile on the CPU: one static graph per image size, compile time kept out of the speeds, DDP's split of the
graph per gradient bucket, SIGTERM and resume. The runs use cheaper backends than inductor: dynamo's graph capture
(and in the DDP run AOT autograd's tracing) as inductor gets them, without inductor's code generation, which takes
about a minute per graph on two cores."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from conftest import FAST, REPO
from test_ddp import torchrun
from test_faults import torchrun as popen_torchrun
from test_faults import worker_pid
from test_resume import wait_for_new_checkpoint

from checkpoint import LATEST
from config import Config, parse_args


@pytest.fixture(scope="module")
def few_digits_dir(digits_dir, tmp_path_factory):
    """30 training and 4 val images per class of the digits: 9 steps an epoch at batch 32."""
    root = tmp_path_factory.mktemp("data") / "few_digits"
    for split, count in (("train", 30), ("val", 4)):
        for folder in sorted((digits_dir / split).iterdir()):
            (root / split / folder.name).mkdir(parents=True)
            for image in sorted(folder.iterdir())[:count]:
                shutil.copy(image, root / split / folder.name / image.name)
    return root


def read_metrics(out):
    with open(out / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_progressive_resizing_compiles_one_static_graph_per_size_and_img_s_leaves_compiling_out(few_digits_dir,
                                                                                                 tmp_path):
    """Three epochs at 32, 48 and 64 px, validated at 40 px: three graphs, none with symbolic sizes, validation
    adds none. A backend that takes COMPILE_SECONDS per graph stands for a slow compiler: those seconds are in
    compile_seconds, and img/s is the speed of the other steps."""
    args = ["--data-dir", few_digits_dir, "--output-dir", tmp_path, *FAST, "--epochs", 3, "--start-image-size", 32,
            "--image-size", 64, "--eval-image-size", 40, "--compile", "--compile-backend", "slow_recording",
            "--no-tensorboard"]
    wrapper = f"""
import json, sys, time, torch, train
from torch._dynamo.utils import counters
COMPILE_SECONDS = 0.5
symbolic = []
def slow_recording(graph_module, example_inputs):
    time.sleep(COMPILE_SECONDS)
    symbolic.append(any(isinstance(v, torch.SymInt) or isinstance(v, torch.Tensor)
                        and any(isinstance(d, torch.SymInt) for d in v.shape) for v in example_inputs))
    return graph_module.forward
torch._dynamo.register_backend(slow_recording, "slow_recording")
code = train.main({[str(a) for a in args]!r})
print(json.dumps({{"graphs": counters["stats"]["unique_graphs"], "symbolic": symbolic}}))
sys.exit(code)
"""
    result = subprocess.run([sys.executable, "-c", wrapper], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    compiled = json.loads(result.stdout.splitlines()[-1])
    rows = read_metrics(tmp_path)
    assert [int(r["image_size"]) for r in rows] == [32, 48, 64]
    assert compiled == {"graphs": 3, "symbolic": [False, False, False]}
    for row in rows:  # every epoch compiled its size in its first step
        compile_seconds, seconds = float(row["compile_seconds"]), float(row["epoch_seconds"])
        assert 0.5 <= compile_seconds < seconds
        steady_images = int(row["train_images"]) - 32
        assert float(row["images_per_second"]) == pytest.approx(steady_images / (seconds - compile_seconds), rel=1e-9)
    assert result.stdout.count("s of it compiling, left out of img/s and the time to go") == 3


def test_the_time_to_go_leaves_compiling_out():
    from outputs import epoch_summary

    row = {"epoch": 1, "train_loss": 1.0, "train_acc1": 50.0, "val_loss": 1.0, "val_acc1": 50.0, "val_acc5": 90.0,
           "val_images": 100, "epoch_seconds": 700.0, "compile_seconds": 400.0, "images_per_second": 1000.0,
           "data_wait_pct": 0.0, "val_seconds": 20.0, "skipped_images": 0}
    line = epoch_summary(row, Config(epochs=11), 720.0, "cuda", 8)
    assert "700 s (400 s of it compiling" in line and "about 53 min to go" in line  # 10 x (300 + 20) s
    assert "compiling" not in epoch_summary({**row, "compile_seconds": 0.0}, Config(epochs=11), 720.0, "cuda", 8)


def test_the_recompile_limit_covers_every_training_size():
    from engine import build_training
    from model import resnet14_tiny
    from runtime import Runtime

    # 16 to 256 px over 20 epochs: 16 sizes, twice dynamo's default limit.
    cfg = Config(compile=True, compile_backend="eager", epochs=20, start_image_size=16, image_size=256)
    with torch._dynamo.config.patch(recompile_limit=8):
        build_training(resnet14_tiny(10), cfg, Runtime())
        assert torch._dynamo.config.recompile_limit == 16


def test_an_unknown_compile_backend_is_refused_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--compile", "--compile-backend", "inductorr"])
    assert exit_info.value.code == 2
    assert "--compile-backend must name a torch.compile backend" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # without --compile it would be ignored, so it is refused too
        parse_args(["--compile-backend", "eager"])
    assert "takes effect only with --compile" in capsys.readouterr().err


@pytest.mark.slow
def test_two_compiled_processes_split_the_graph_stop_on_sigterm_mid_epoch_and_resume(few_digits_dir, tmp_path):
    """Two gloo processes compile resnet26_narrow, whose 3.5 MB of gradients fill DDP's first bucket (1 MiB) and a
    second: dynamo splits the graph there, so that the first bucket's all-reduce can overlap the rest of the
    backward. SIGTERM (a spot interruption) stops them mid-epoch; the rerun compiles again, and ends with one
    metrics row per epoch and compile times that add up across the stop."""
    out = tmp_path / "ddp"
    args = ["--data-dir", few_digits_dir, "--output-dir", out, *FAST, "--workers", 0, "--arch", "resnet26_narrow",
            "--batch-size", 16, "--epochs", 2, "--checkpoint-minutes", 0.0001, "--log-every", 1, "--compile",
            "--compile-backend", "aot_eager", "--no-tensorboard"]
    job = popen_torchrun(*args)
    try:
        wait_for_new_checkpoint(out, job, None)  # after the first step, which compiled
        for rank in (0, 1):
            os.kill(worker_pid(job, rank), signal.SIGTERM)
        output, _ = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert job.returncode == 0 and "Stopped by SIGTERM" in output, output[-3000:]
    stopped = torch.load(out / LATEST, map_location="cpu", weights_only=True)
    assert stopped["epoch"] == 0 and 0 < stopped["samples_done"] < 288
    assert stopped["epoch_compile_images"] == 32 and stopped["epoch_compile_seconds"] > 0  # one step of 2 x 16

    resumed = torchrun(*args, env={"TORCH_LOGS": "dynamo"})  # INFO: DDPOptimizer says how it split the graph
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"epoch 1, {stopped['samples_done']}/300 images of it done" in resumed.stdout
    assert resumed.stderr.count("DDPOptimizer used bucket cap 26214400 and created 2 buckets") == 2  # one per rank
    assert resumed.stdout.count("Weights identical on all 2 ranks") == 2
    rows = read_metrics(out)
    assert [r["epoch"] for r in rows] == ["1", "2"] and all(r["train_images"] == "288" for r in rows)
    # Epoch 1 compiled in both runs, one step each; epoch 2, at the same size, in neither.
    seconds, compile_seconds = float(rows[0]["epoch_seconds"]), float(rows[0]["compile_seconds"])
    assert compile_seconds > stopped["epoch_compile_seconds"]
    assert float(rows[0]["images_per_second"]) == pytest.approx((288 - 2 * 32) / (seconds - compile_seconds), rel=1e-9)
    assert float(rows[1]["compile_seconds"]) == 0
    assert float(rows[1]["images_per_second"]) == pytest.approx(288 / float(rows[1]["epoch_seconds"]), rel=1e-9)
