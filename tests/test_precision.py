"""--precision: what auto picks on each kind of GPU, and fp16 with loss scaling on the CPU. bf16 and fp16 runs
through a stop and a resume are in test_resume.py."""

from types import SimpleNamespace

import pytest
import torch
from conftest import FAST, run_train

from config import UsageError
from gpu_check import GpuCheck
from runtime import resolve_precision

GPUS = {"Tesla V100-SXM2-16GB": (7, 0), "Tesla T4": (7, 5), "NVIDIA A100-SXM4-40GB": (8, 0)}


@pytest.fixture
def fake_gpu(monkeypatch):
    """One CUDA GPU as torch.cuda describes it: its properties, and that a bf16 tensor can be made on it, which
    torch's emulation allows on every CUDA GPU."""

    def install(name: str) -> None:
        major, minor = GPUS[name]
        properties = SimpleNamespace(name=name, major=major, minor=minor)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: properties)
        monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)

    return install


@pytest.mark.parametrize(("gpu", "expected"), [("Tesla V100-SXM2-16GB", "fp16"), ("Tesla T4", "fp16"),
                                               ("NVIDIA A100-SXM4-40GB", "bf16")])
def test_auto_picks_bf16_only_where_the_gpu_has_it_in_hardware(fake_gpu, gpu, expected):
    fake_gpu(gpu)
    assert torch.cuda.is_bf16_supported()  # the emulated answer the choice must not follow
    cuda = torch.device("cuda", 0)
    assert resolve_precision("auto", cuda) == expected
    assert resolve_precision("fp16", cuda) == "fp16"
    assert GpuCheck.precision_unavailable(SimpleNamespace(cuda=True), "bf16") == (
        None if expected == "bf16" else "no bf16 on this GPU")


def test_bf16_asked_for_on_a_gpu_without_it_is_refused_naming_the_gpu_and_the_fix(fake_gpu):
    fake_gpu("Tesla T4")
    with pytest.raises(UsageError) as refused:
        resolve_precision("bf16", torch.device("cuda", 0))
    message = str(refused.value)
    assert "Tesla T4, compute capability 7.5" in message and "--precision fp16" in message
    assert "\n" not in message
    fake_gpu("NVIDIA A100-SXM4-40GB")
    assert resolve_precision("bf16", torch.device("cuda", 0)) == "bf16"


def test_fp16_on_the_cpu_stops_on_a_non_finite_loss(digits_dir, tmp_path):
    """The loss scaler skips every step whose gradients overflow, so weights that a huge LR blew up stay finite,
    and only the loss shows that training failed: it must stop the run (exit 3), not be skipped along."""
    result = run_train("--data-dir", digits_dir, "--output-dir", tmp_path / "run", *FAST, "--epochs", 1,
                       "--lr", "1e30", "--precision", "fp16")
    assert result.returncode == 3, result.stderr
    assert "The training loss became non-finite in epoch 1 at step 10" in result.stdout
