"""benchmark.py's interface, which other tools parse: each subcommand runs on the CPU at small sizes and, with
--json, prints one JSON object per measurement."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import FAST, REPO
from PIL import Image

from benchmark import build_parser

# benchmark.py computes on every core, as it should on a GPU box; here other tests may be busy on some of them.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def benchmark(*args, timeout=300) -> list[dict]:
    result = subprocess.run([sys.executable, "benchmark.py", *map(str, args), "--json"], cwd=REPO,
                            capture_output=True, text=True, timeout=timeout, env=ONE_THREAD)
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


@pytest.mark.parametrize("command", [
    ["loader", "--data-dir", "/tmp", "--workers", "-3"],
    ["loader", "--data-dir", "/tmp", "--batch-size", "0"],
    ["loader", "--data-dir", "/tmp", "--seconds", "nan"],
    ["make-data", "--out", "/tmp/never-written", "--images", "-1"],
    ["gpu-check", "--minutes", "-1"],
    ["gpu-check", "--compute-sizes", "224,0"],
    ["train", "--data-dir", "/tmp", "--decode", "gpu", "--gpu-decode-share", "0.5,2"],
])
def test_bad_values_are_refused_before_anything_runs(command, capsys):
    with pytest.raises(SystemExit) as refused:
        build_parser().parse_args(command)
    flag = next(arg for arg in command[::-1] if arg.startswith("--"))
    out, err = capsys.readouterr()
    assert refused.value.code == 2 and f"argument {flag}: expected" in err and out == ""


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
    no_val = subprocess.run([sys.executable, "benchmark.py", "train", "--data-dir", bench_dir / "train"], cwd=REPO,
                            capture_output=True, text=True)
    assert no_val.returncode == 2 and "has no train/ folder" in no_val.stderr and "Traceback" not in no_val.stderr


def md_tables(text: str) -> list[list[list[str]]]:
    """The markdown tables in text, each a list of rows of cells (separator rows included)."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            assert line.endswith("|"), line
            current.append([c.strip() for c in line[1:-1].replace("\\|", "\0").split("|")])
        elif current:
            tables.append(current)
            current = []
    return tables


def run_gpu_check(out, *args, env=None) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """`benchmark.py gpu-check --json` at tiny sizes on the CPU; its rows, checked to be those of its JSONL file. On
    a timeout it gets Ctrl-C, which stops the train.py it may be running in that one's own session."""
    command = [sys.executable, "benchmark.py", "gpu-check", "--images", 16, "--batch-size", 4, "--image-size", 32,
               "--steps", 2, "--minutes", 2, "--workers", 1, "--loader-seconds", 1, "--out", out, "--json", *args]
    proc = subprocess.Popen(list(map(str, command)), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**(env or os.environ), "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.communicate(timeout=30)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert rows == [json.loads(line) for line in out.read_text().splitlines()]  # the file holds what was printed
    assert rows[0]["what"] == "environment" and rows[-1]["what"] == "summary"
    return result, rows


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what gpu-check does on a machine without a GPU")
def test_gpu_check_without_a_gpu_runs_every_section_the_cpu_can_and_records_the_rest_as_skipped(tmp_path):
    out = tmp_path / "check.jsonl"
    result, rows = run_gpu_check(out)
    env, *measured, summary = rows
    assert env["gpu"] is None and env["settings"]["minutes"] == 2
    assert {"torch", "torchvision", "python", "cpus", "code", "command"} <= env.keys()
    assert all(r["status"] == "ok" or r["status"] == "skipped" and r["reason"] for r in measured)
    by = {what: [r for r in measured if r["what"] == what] for what in {r["what"] for r in measured}}
    assert by.keys() == {"make-data", "compute", "loader", "train", "sync-check"}  # no section stopped

    [data] = by["make-data"]
    assert data["status"] == "ok" and data["images"] == 16 + 10 and data["train_images"] == 16

    # Everything that needs a GPU is there, skipped, with the reason.
    assert len(by["compute"]) == 2 * 2 * 3 * 2  # models x precisions x (32, 224, 176 px) x eager/compiled
    assert {(r["model"], r["precision"], r["image_size"], r["compile"]) for r in by["compute"]} == {
        (m, p, s, c) for m in ("project", "torchvision") for p in ("bf16", "fp16") for s in (32, 224, 176)
        for c in (False, True)}
    gpu_only = by["compute"] + [r for r in by["loader"] + by["train"] if r.get("route", r.get("decode"))
                                in ("gpu", "dali")]
    assert all(r["status"] == "skipped" and r["reason"] == "no CUDA device" for r in gpu_only)

    # The CPU-capable routes were measured.
    assert [(r["route"], r.get("gpu_decode_share")) for r in by["loader"]] == [
        ("torchvision", None), ("cpu", None), ("dali", None), ("gpu", 0.25), ("gpu", 0.5), ("gpu", 1.0)]
    assert all(r["img_s"] > 0 and r["workers"] == 1 for r in by["loader"][:2])
    assert [(r["decode"], r.get("gpu_decode_share")) for r in by["train"]] == [
        ("cpu", None), ("dali", None), ("gpu", 0.25), ("gpu", 0.5), ("gpu", 1.0)]
    cpu_run = by["train"][0]
    # 16 images, batch 4: a warm-up epoch, then one timed epoch of 4 steps covers --steps 2
    assert cpu_run["status"] == "ok" and cpu_run["steps"] == 4 and cpu_run["precision"] == "fp32"
    assert cpu_run["img_s"] > 0 and 0 <= cpu_run["data_wait_pct"] < 100
    assert cpu_run["compute_only_img_s"] is None and cpu_run["ratio"] is None  # compute-only needs the GPU

    # The sync check ran train.py's loop for real, up to its first sync point after --steps 2 (the epoch's
    # end, its 4th step), and says that a CPU cannot show a sync.
    [sync] = by["sync-check"]
    assert sync["status"] == "skipped" and sync["steps"] == 4 and sync["syncs"] == 0 and sync["sites"] == {}
    assert sync["reason"] == "no CUDA device: synchronizations cannot be observed; 4 steps ran through train.py's loop"
    assert "Sync check: 4 steps ran, but without a CUDA device no synchronization can be observed." in result.stderr

    assert summary["status"] == "ok" and summary["failed"] == 0
    assert (summary["ok"], summary["skipped"]) == (4, len(measured) - 4)
    assert "Traceback" not in result.stderr

    # The markdown: beside the JSONL and at the end of stderr, a heading per section, tables of equal rows.
    table = out.with_suffix(".md").read_text()
    assert summary["markdown"] == str(out.with_suffix(".md")) and result.stderr.rstrip().endswith(table.rstrip())
    assert table.startswith("## No GPU, ") and "`python benchmark.py gpu-check`" in table
    assert [line for line in table.splitlines() if line.startswith("### ")] == [
        "### Compute only", "### Input routes", "### train.py end to end", "### Sync check"]
    assert "Not measured (no CUDA device): bf16 eager at 32 px, " in table  # a line, not 24 rows of "skipped"
    loaders, runs, check = md_tables(table)
    for rows_, columns in ((loaders, 3), (runs, 6), (check, 2)):
        assert all(len(row) == columns for row in rows_) and set(rows_[1]) == {"---"}
    assert loaders[0] == ["input route", "GPU decode share", "img/s"] and len(loaders) == 2 + 6
    assert loaders[3] == ["`--decode cpu`", "", f"{by['loader'][1]['img_s']:.3g}"]
    assert runs[2][:2] == ["`--decode cpu`", ""] and runs[2][4] == f"{cpu_run['data_wait_pct']:.0f}%"
    assert runs[3] == ["`--decode dali`", "", "skipped: no CUDA device", "", "", ""]
    assert check[2] == [f"skipped: {sync['reason']}", ""]


@pytest.mark.parametrize("route", ["torchvision", "cpu", "gpu", "dali"])
def test_gpu_checks_loader_measurement_feeds_each_route_through_its_decoder(bench_dir, route, monkeypatch):
    """gpu-check's per-route loader figure, with the device routes forced on as on a GPU: each batch must reach
    the model's input through the route's own decoder, as in train.py."""
    import argparse

    import dali_decode
    import engine
    import gpu_check
    import gpu_decode

    if route == "dali" and dali_decode.dali_missing():
        pytest.skip(f"nvidia-dali is not installed ({dali_decode.dali_missing()})")
    monkeypatch.setattr(engine, "decode_route", lambda requested, device: (requested, "forced"))
    decoded = []
    for decoder in (gpu_decode.DeviceBatchDecoder, dali_decode.DaliBatchDecoder):
        def counting(self, batch, labels, skipped, real=decoder.decode_batch, name=decoder.__name__):
            decoded.append(name)
            return real(self, batch, labels, skipped)
        monkeypatch.setattr(decoder, "decode_batch", counting)
    args = argparse.Namespace(image_size=32, batch_size=4, workers=0)
    img_s = gpu_check.measure_loader(route, 0.5, bench_dir, args, torch.device("cpu"), seconds=0.5)
    assert img_s > 0
    expected = {"gpu": "DeviceBatchDecoder", "dali": "DaliBatchDecoder"}.get(route)
    assert set(decoded) == ({expected} if expected else set()) and (len(decoded) >= 4 or not expected)


# train.py under a stand-in for torch's sync debug mode, which needs CUDA: the mode is a variable, and two
# functions synchronize as a read of a device tensor on the host does, warning while the mode is "warn": the
# step (between sync points: counted) and the sync point's all-reduce (where the host waits by design: not).
SYNC_CHECK_ON_A_GPU = """
import sys
import warnings

import torch

import engine
import train

mode = ["default"]
torch.cuda.set_sync_debug_mode = lambda debug_mode: mode.__setitem__(0, debug_mode)
on_cpu = train.SyncCheck.__init__


def on_a_gpu(self, *args):
    on_cpu(self, *args)
    self.observed = True


def synchronizing(function):
    def wrapped(*args, **kwargs):
        if mode[0] == "warn":
            warnings.warn("called a synchronizing CUDA operation")
        warnings.warn("an unrelated warning")
        return function(*args, **kwargs)
    return wrapped


train.SyncCheck.__init__ = on_a_gpu
engine.train_step = synchronizing(engine.train_step)
train.all_reduce = synchronizing(train.all_reduce)
code = train.main(sys.argv[1:])
print("debug mode after the check:", mode[0])
sys.exit(code)
"""


def test_train_pys_sync_check_counts_syncs_between_sync_points_only_and_stops_without_saving(digits_dir, tmp_path):
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-c", SYNC_CHECK_ON_A_GPU, "--data-dir", digits_dir, "--output-dir", out,
                             *FAST, "--workers", "0", "--log-every", "2", "--sync-check-steps", "3"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    found = json.loads((out / "sync_check.json").read_text())
    # On to the first sync point after step 3: step 4. Each step synchronized once, in train_step.
    assert found["steps"] == 4 and found["observed"] and found["syncs"] == 4
    [(site, count)] = found["sites"].items()
    assert count == 4 and site.startswith("train.py:") and "engine.train_step(" in site and "all_reduce" not in site
    assert f"Sync check: 4 synchronizations in 4 steps between the loop's sync points\n  4 x {site}" in result.stdout
    assert "debug mode after the check: default" in result.stdout
    assert "an unrelated warning" in result.stderr  # other warnings are still shown
    assert sorted(p.name for p in out.iterdir()) == ["sync_check.json", "train.lock"]  # no checkpoint, no metrics


def test_the_time_budget_passes_unused_time_on_to_later_sections(monkeypatch):
    import gpu_check

    # The budget counts from the process's start; this pytest process may be older than the 10 minutes.
    monkeypatch.setattr(gpu_check, "process_age", lambda: 0.0)
    budget = gpu_check.Budget(10, {"a": 1, "b": 1, "c": 2})
    start = time.monotonic()
    left = budget.end - start
    assert budget.deadline("a") - start == pytest.approx(left / 4, abs=0.5)
    assert budget.deadline("not run") == pytest.approx(time.monotonic(), abs=0.5)  # no time for a skipped section
    # b finished at once: c (2 of the remaining weight 3) gets two thirds of what is left, not half of the original.
    assert budget.deadline("b") - start == pytest.approx(left / 3, abs=0.5)
    assert budget.deadline("c") == budget.end


@pytest.fixture
def without(tmp_path):
    """An environment for a subprocess in which the named packages cannot be imported, as on a stock GPU image
    that lacks them."""
    def env(*packages):
        hidden = tmp_path / "hidden"
        for package in packages:
            (hidden / package).mkdir(parents=True)
            (hidden / package / "__init__.py").write_text(f"raise ImportError('{package} is hidden here')\n")
        return {**os.environ, "PYTHONPATH": os.pathsep.join([str(hidden), os.environ.get("PYTHONPATH", "")])}
    return env


def test_without_simplejpeg_train_py_refuses_in_one_line_naming_the_requirements(digits_dir, tmp_path, without):
    result = subprocess.run([sys.executable, "train.py", "--data-dir", digits_dir, "--output-dir", tmp_path / "run",
                             *FAST], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env=without("simplejpeg"))
    assert result.returncode == 2
    assert result.stderr == ("error: simplejpeg, the loader's JPEG decoder, is not installed; install the "
                             "requirements with `pip install -r requirements.txt`.\n")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what gpu-check does on a machine without a GPU")
def test_gpu_check_without_scikit_learn_and_simplejpeg_records_what_each_section_lacks(tmp_path, without):
    """A stock GPU image: gpu-check still starts, each section says in one line why it did not measure, and the
    JSON lines and the table are written."""
    out = tmp_path / "check.jsonl"
    result, rows = run_gpu_check(out, env=without("simplejpeg", "sklearn"))
    by = {what: [r for r in rows if r["what"] == what] for what in {r["what"] for r in rows}}
    assert by["make-data"] == [{"what": "make-data", "status": "skipped",
                                "reason": "scikit-learn is not installed (pip install -r requirements.txt)"}]
    no_data = "no data: make-data needs scikit-learn (pip install -r requirements.txt)"
    assert all(r["status"] == "skipped" and r["reason"] in (no_data, "no CUDA device")
               for r in by["loader"] + by["train"] + by["sync-check"] + by["compute"])
    assert by["loader"][0]["reason"] == no_data and by["sync-check"][0]["reason"] == no_data
    assert by["summary"][0]["status"] == "ok" and "Traceback" not in result.stderr
    assert out.with_suffix(".md").read_text().startswith("## No GPU")


def test_gpu_check_without_simplejpeg_measures_only_the_torchvision_route(monkeypatch):
    import data
    import gpu_check

    monkeypatch.setattr(data, "simplejpeg", None)
    missing = "simplejpeg is not installed (pip install -r requirements.txt)"
    assert gpu_check.route_unavailable("torchvision", cuda=True) is None
    assert all(gpu_check.route_unavailable(route, cuda) == missing for route in ("cpu", "gpu", "dali")
               for cuda in (False, True))


def test_gpu_check_skips_a_dali_that_is_installed_but_fails_to_load(monkeypatch):
    """pip's nvidia-dali built for another CUDA imports its package but not its libraries: a reason to skip the
    route, not to fail it."""
    import gpu_check

    monkeypatch.setattr(gpu_check, "dali_missing", lambda: "OSError: libnvimgcodec.so.0: cannot open shared object")
    assert gpu_check.route_unavailable("dali", cuda=True) == (
        "nvidia-dali cannot be imported (OSError: libnvimgcodec.so.0: cannot open shared object; pip install -r "
        "requirements-dali.txt)")
    monkeypatch.setattr(gpu_check, "dali_missing", lambda: None)
    assert gpu_check.route_unavailable("dali", cuda=True) is None


def test_a_gpu_check_section_that_raises_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    import gpu_check

    def disk_full(self, root):
        raise OSError(28, "No space left on device")

    ran = []
    monkeypatch.setattr(gpu_check.GpuCheck, "make_data", disk_full)
    for section in ("compute", "compile"):
        monkeypatch.setattr(gpu_check.GpuCheck, section, lambda self, name=section: ran.append(name))
    for section in ("loaders", "train_runs", "sync"):
        monkeypatch.setattr(gpu_check.GpuCheck, section, lambda self, root, name=section: ran.append(name))
    args = build_parser().parse_args(["gpu-check", "--out", str(tmp_path / "check.jsonl"), "--minutes", "1"])
    assert gpu_check.gpu_check(args) == 1
    assert ran == ["compute", "loaders", "train_runs", "sync", "compile"]
    rows = [json.loads(line) for line in (tmp_path / "check.jsonl").read_text().splitlines()]
    assert rows[1] == {"what": "section", "section": "make-data", "status": "failed",
                       "reason": "OSError: [Errno 28] No space left on device"}
    assert rows[2]["what"] == "summary" and rows[2]["failed"] == 1
    assert ("The make-data section stopped: OSError: [Errno 28] No space left on device (the sections after it "
            "went on).") in (tmp_path / "check.md").read_text()
