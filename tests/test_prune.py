"""prune.py on a trained demo network: half the parameters, a weights-only file every loader takes, and a
fine-tuning run (train.py --init-from) that recovers the accuracy."""

import json
import subprocess
import sys

import pytest
import torch
from inference_fixtures import DIGITS, ROOT, demo_checkpoint  # noqa: F401  (a fixture)

import evaluate
import export
import prune
from checkpoint import LATEST, read_checkpoint
from inference import load_classifier

PARITY_BOUND = 1e-4  # the same function in the same float32 arithmetic; only summation order may differ
# Measured on the 2-epoch fixture (val top-1 35.8%): pruned to half the parameters it falls to 10.3%, and two
# epochs of fine-tuning bring it to 53.3%. "Recovers" means at most this many points below the unpruned network.
RECOVERY_POINTS = 3.0


def run(capsys, module, *argv) -> tuple[int, str, str]:
    code = module.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_half_the_parameters_in_a_weights_only_file_that_computes_the_pruned_network(
        demo_checkpoint, tmp_path, capsys):  # noqa: F811
    path = tmp_path / "pruned.pth"
    code, out, _ = run(capsys, prune, "--checkpoint", demo_checkpoint, "--ratio", "0.5", "--output", path, "--json")
    assert code == 0
    result = json.loads(out)
    assert result["params_after"] <= 0.55 * result["params_before"]
    assert result["macs_after"] < 0.6 * result["macs_before"]
    state = torch.load(path, weights_only=True)
    assert state["pruned"]["ratio"] == 0.5 and state["class_names"] == [f"digit_{i}" for i in range(10)]
    loaded = load_classifier(path).model
    assert sum(p.numel() for p in loaded.parameters()) == result["params_after"]
    assert loaded.fc.out_features == 10  # the classifier keeps one output per class

    # The file computes what pruning the same checkpoint in memory gives.
    clf = load_classifier(demo_checkpoint)
    in_memory = prune.prune_model(clf.model, 0.5, clf.image_size)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (loaded(x) - in_memory(x)).abs().max().item() <= PARITY_BOUND

    # The Space's weights file (export.py space) describes the narrower network as well.
    export.save_weights(load_classifier(path), tmp_path / "model.safetensors", fp16=False)
    with torch.no_grad():
        assert (load_classifier(tmp_path / "model.safetensors").model(x) - loaded(x)).abs().max().item() == 0


def test_fine_tuning_recovers_and_every_tool_takes_the_result(demo_checkpoint, tmp_path, capsys):  # noqa: F811
    path = tmp_path / "pruned.pth"
    assert run(capsys, prune, "--checkpoint", demo_checkpoint, "--ratio", "0.5", "--output", path)[0] == 0
    unpruned = read_checkpoint(demo_checkpoint)["history"][-1]["val_acc1"]

    code, out, _ = run(capsys, export, "onnx", "--checkpoint", path, "--output", tmp_path / "pruned.onnx", "--json")
    assert code == 0 and json.loads(out)["max_abs_diff"] <= PARITY_BOUND

    tuned = tmp_path / "tuned"
    cmd = [sys.executable, str(ROOT / "train.py"), "--demo", "--arch", "resnet14_tiny", "--epochs", "2",
           "--output-dir", str(tuned), "--init-from", str(path)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    state = torch.load(tuned / LATEST, weights_only=True)
    assert state["pruned"]["ratio"] == 0.5  # its loaders must rebuild the narrow network too
    assert state["model"]["fc.weight"].shape[1] < read_checkpoint(demo_checkpoint)["model"]["fc.weight"].shape[1]
    tuned_acc1 = state["history"][-1]["val_acc1"]
    assert tuned_acc1 >= unpruned - RECOVERY_POINTS, (tuned_acc1, unpruned)

    code, out, _ = run(capsys, evaluate, "--checkpoint", tuned / LATEST, "--data-dir", DIGITS, "--json",
                       "--workers", 0)
    assert code == 0 and abs(json.loads(out)["acc1"] - tuned_acc1) <= 1e-6

    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)  # resumes the narrow network
    assert again.returncode == 0 and "already finished" in again.stdout, again.stderr


@pytest.mark.parametrize("ratio, make_file, message", [
    ("0.5", lambda tmp: tmp / "missing.pth", "No model file at"),
    ("0.5", lambda tmp: (tmp / "notes.pth").write_text("not a checkpoint") and tmp / "notes.pth", "holds text"),
    ("0", None, "--ratio 0.0 is outside (0, 1)"),
    ("1.5", None, "--ratio 1.5 is outside (0, 1)"),
])
def test_bad_input_is_refused_in_one_paragraph(
        demo_checkpoint, tmp_path, capsys, ratio, make_file, message):  # noqa: F811
    checkpoint = make_file(tmp_path) if make_file else demo_checkpoint
    code, out, err = run(capsys, prune, "--checkpoint", checkpoint, "--ratio", ratio, "--output", tmp_path / "p.pth")
    assert code == 2 and not out and not (tmp_path / "p.pth").exists()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_without_torch_pruning_it_says_what_to_install(demo_checkpoint, tmp_path, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # import raises ImportError
    code, out, err = run(capsys, prune, "--checkpoint", demo_checkpoint, "--ratio", "0.5", "--output", tmp_path / "p")
    assert code == 2 and not out and not (tmp_path / "p").exists()
    assert err.count("\n") == 1 and "pip install 'torch-pruning>=1.5,<2'" in err, err
