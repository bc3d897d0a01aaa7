"""A machine whose NVIDIA driver reports GPUs that torch cannot use: every script refuses before any work, with
the driver, torch's CUDA version and the fix. nvidia-smi is a stub on PATH (it cannot exist here); train.py,
evaluate.py, lr_finder.py and benchmark.py are the real ones."""

import importlib
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAST, REPO, run_train

import nvidia_driver
from config import UsageError
from nvidia_driver import Gpus, choose_build, gpus_torch_cannot_use, gpus_wanted, nvidia_gpus
from runtime import resolve_device

# Here torch sees no GPU; on a GPU box it would see the real ones, not the stub's.
needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="torch sees a real GPU here")


def stub_nvidia_smi(folder: Path, *rows: str, rc: int = 0) -> str:
    """A PATH whose nvidia-smi prints these rows (driver, compute capability, MIG mode), then the real PATH."""
    folder.mkdir(exist_ok=True)
    script = folder / "nvidia-smi"
    script.write_text("#!/bin/sh\n" + "".join(f"echo '{row}'\n" for row in rows) + f"exit {rc}\n")
    script.chmod(0o755)
    return f"{folder}{os.pathsep}{os.environ['PATH']}"


def eight(driver: str, capability: str = "9.0") -> list[str]:
    return [f"{driver}, {capability}, Disabled"] * 8


@pytest.mark.parametrize("driver, capabilities, build", [
    ("580.65.06", [(9, 0)], "cu130"),
    ("580.65.06", [(12, 0)], "cu130"),  # Blackwell: only CUDA 13 has its kernels
    ("580.65.06", [(7, 5), (7, 0)], "cu126"),  # one V100 among them: CUDA 13 has no Volta kernels
    ("579.99", [(9, 0)], "cu126"),
    ("535.104.05", [(8, 0)], "cu126"),
    ("525.60.13", [], "cu126"),  # no compute capability reported: the driver decides alone
    ("525.60.12", [], None),
    ("570.172.08", [(10, 0)], None),  # Blackwell needs a 580 driver
    ("580.65.06", [(3, 7)], None),  # Kepler: no build has its kernels
])
def test_the_build_for_a_driver_and_its_gpus(driver, capabilities, build):
    chosen = choose_build(Gpus(driver, max(1, len(capabilities)), capabilities, False, "nvidia-smi"))
    assert (chosen.tag if chosen else None) == build


@pytest.mark.parametrize("visible, wanted", [(None, 4), ("", 0), ("-1", 0), ("0,1", 2), ("1,7,2", 1),
                                             ("GPU-8f6b3c1e", 1), ("3,NoDevFiles", 1)])
def test_cuda_visible_devices_decides_how_many_gpus_torch_should_see(visible, wanted):
    assert gpus_wanted(Gpus("580.65.06", 4, [], False, "nvidia-smi"), visible) == wanted
    assert gpus_wanted(Gpus("580.65.06", 4, [], True, "nvidia-smi"), visible) == min(wanted, 1)  # MIG


def test_the_driver_from_nvidia_smi_or_else_the_kernel_module(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", stub_nvidia_smi(tmp_path / "bin", "535.104.05, 8.0, Disabled",
                                               "535.104.05, 8.0, Enabled"))
    assert nvidia_gpus() == Gpus("535.104.05", 2, [(8, 0), (8, 0)], True, "nvidia-smi")

    # nvidia-smi missing or failing: the kernel module's version and the device files a process here can open.
    monkeypatch.setenv("PATH", stub_nvidia_smi(tmp_path / "bin", "NVIDIA-SMI has failed", rc=9))
    version, dev = tmp_path / "version", tmp_path / "dev"
    version.write_text("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build  "
                       "(dvs-builder@U16-I3-B03-4-3)  Tue Jul 15 00:00:00 UTC 2025\nGCC version:  gcc 12.3.0\n")
    dev.mkdir()
    for name in ("nvidiactl", "nvidia-uvm", "nvidia-caps"):
        (dev / name).touch()
    assert nvidia_gpus(version, dev) is None  # a container given no GPU sees the host's module, not its GPUs
    for name in ("nvidia0", "nvidia1", "nvidia2"):
        (dev / name).touch()
    gpus = nvidia_gpus(version, dev)
    assert (gpus.driver, gpus.count, gpus.capabilities) == ("580.65.06", 3, [])
    assert nvidia_gpus(tmp_path / "absent", dev) is None  # no NVIDIA driver at all


def test_the_paragraph_names_driver_cuda_and_the_fix():
    old_driver = Gpus("535.104.05", 8, [(9, 0)] * 8, False, "nvidia-smi")
    text = gpus_torch_cannot_use(0, "2.14.1+cu130", "13.0", None, old_driver)
    assert "8 NVIDIA GPUs (nvidia-smi: driver 535.104.05, compute capability 9.0)" in text
    assert "PyTorch 2.14.1+cu130 sees none of them" in text
    assert "built for CUDA 13.0, which needs driver 580 or newer" in text
    assert "pip install torch==2.14.1+cu126" in text and "--index-url https://download.pytorch.org/whl/cu126" in text
    assert "or update the driver to 580 or newer" in text and "--device cpu" in text
    assert "\n" not in text

    new_driver = Gpus("580.65.06", 8, [(9, 0)] * 8, False, "nvidia-smi")
    text = gpus_torch_cannot_use(0, "2.14.1+cpu", None, None, new_driver)
    assert "a build without CUDA" in text and "torch==2.14.1+cu130" in text and "whl/cu130" in text
    text = gpus_torch_cannot_use(7, "2.14.1+cu130", "13.0", None, new_driver)
    assert "sees only 7" in text and "which this driver runs" in text and "error state" in text
    assert "pip install" not in text  # another build would not help

    too_old = Gpus("470.256.02", 1, [(8, 0)], False, "nvidia-smi")
    assert "update the driver to 525.60.13 or newer" in gpus_torch_cannot_use(0, "2.14.1+cu130", "13.0", None, too_old)

    assert gpus_torch_cannot_use(8, "2.14.1+cu130", "13.0", None, new_driver) is None
    assert gpus_torch_cannot_use(0, "2.14.1+cu130", "13.0", "", new_driver) is None  # CUDA_VISIBLE_DEVICES=
    assert gpus_torch_cannot_use(2, "2.14.1+cu130", "13.0", "0,1", new_driver) is None
    assert "2 of them named in CUDA_VISIBLE_DEVICES" in gpus_torch_cannot_use(1, "2.14.1+cu130", "13.0", "0,1",
                                                                              new_driver)


def test_no_nvidia_driver_means_the_cpu_as_before(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi
    if Path("/proc/driver/nvidia/version").exists():
        pytest.skip("this machine has an NVIDIA kernel driver")
    assert nvidia_gpus() is None
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")


@needs_no_gpu
def test_train_py_refuses_a_gpu_box_whose_torch_sees_no_gpu(digits_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", stub_nvidia_smi(tmp_path / "bin", *eight("550.54.15")))  # run_train passes it on
    auto = [a for a in FAST if a not in ("--device", "cpu")]
    out = tmp_path / "run"
    refused = run_train("--data-dir", digits_dir, "--output-dir", out, *auto, "--epochs", 1, timeout=120)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert refused.stderr.startswith("error: This machine has 8 NVIDIA GPUs (nvidia-smi: driver 550.54.15")
    assert f"built for CUDA {torch.version.cuda}" in refused.stderr or "a build without CUDA" in refused.stderr
    assert "--index-url https://download.pytorch.org/whl/cu126" in refused.stderr
    assert "Data:" not in refused.stdout and not out.exists()  # before any work

    meant = run_train("--data-dir", digits_dir, "--output-dir", out, *FAST, "--epochs", 1)
    assert meant.returncode == 0, meant.stderr
    assert "on 1 x cpu" in meant.stdout
    assert "*** On the CPU" not in meant.stdout  # 1,437 images: no forecast

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the other way to mean it; the run is done, so it just says so
    hidden = run_train("--data-dir", digits_dir, "--output-dir", out, *auto, "--epochs", 1)
    assert hidden.returncode == 0, hidden.stderr
    assert "This run is already finished" in hidden.stdout


@needs_no_gpu
@pytest.mark.parametrize("script", ["evaluate", "lr_finder", "benchmark"])
def test_the_other_scripts_refuse_too(script, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", stub_nvidia_smi(tmp_path / "bin", *eight("535.104.05")))
    argv = {"evaluate": ["--checkpoint", str(tmp_path / "checkpoint.pth")],
            "lr_finder": ["--data-dir", str(tmp_path / "data"), "--output-dir", str(tmp_path / "lr")],
            "benchmark": ["compute", "--steps", "1", "--batch-size", "2", "--image-size", "32", "--warmup", "0",
                          "--rounds", "1", "--models", "project"]}[script]  # light, should it run
    module = importlib.import_module(script)
    if script == "benchmark":
        monkeypatch.setattr(sys, "argv", ["benchmark.py", *argv])
        code = module.main()
    else:
        code = module.main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: This machine has 8 NVIDIA GPUs (nvidia-smi: driver 535.104.05")
    assert not (tmp_path / "lr").exists()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert resolve_device("auto") == "cpu"


@needs_no_gpu
def test_device_cuda_on_such_a_box_gets_the_same_paragraph(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", stub_nvidia_smi(tmp_path / "bin", *eight("535.104.05")))
    with pytest.raises(UsageError, match="driver 535.104.05.*whl/cu126"):
        resolve_device("cuda")
    assert resolve_device("cpu") == "cpu"


def test_the_module_needs_only_the_standard_library():
    """setup_and_train.sh runs it with the system python3, before any venv exists."""
    source = (REPO / "nvidia_driver.py").read_text()
    imports = {line.split()[1].split(".")[0] for line in source.splitlines() if line.startswith(("import ", "from "))}
    assert imports <= set(sys.stdlib_module_names), imports
    assert nvidia_driver.INDEX_URL == "https://download.pytorch.org/whl/"
