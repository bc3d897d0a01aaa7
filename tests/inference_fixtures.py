"""A small trained checkpoint for the tests of evaluate.py, export.py, predict.py and app.py.

One short train.py run on the bundled digits per test session, whichever of those test files run and in
however many test processes.
"""

import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import built_once, run_job

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DIGITS = ROOT / "data" / "digits"


@pytest.fixture(scope="session")
def demo_checkpoint(tmp_path_factory) -> Path:
    """runs/.../checkpoint.pth of a 2-epoch resnet14_tiny on the digits (32 px); data/digits is created by
    train.py --demo if it is not there yet."""
    def build(out):
        done = run_job([sys.executable, str(ROOT / "train.py"), "--demo", "--arch", "resnet14_tiny", "--epochs", "2",
                        "--output-dir", str(out)], 300, cwd=ROOT)
        assert done.returncode == 0, done.stderr

    return built_once(tmp_path_factory, "demo_run", build) / "checkpoint.pth"


def a_val_image(label: int = 3) -> Path:
    from data import make_demo_dataset  # a no-op once the digits exist; tests may run in any order

    make_demo_dataset(DIGITS)
    return sorted((DIGITS / "val" / f"digit_{label}").glob("*.jpg"))[0]


# ---------------------------------------------------------------------------------------- scores, computed directly

def direct_scores(logits, labels) -> dict:
    """Top-1, top-5 and mean cross-entropy by definition, in plain Python: the label's rank among the logits and
    -log(softmax) of the label."""
    logits, labels = torch.as_tensor(logits).tolist(), torch.as_tensor(labels).tolist()
    ranks = [sum(v > row[y] for v in row) for row, y in zip(logits, labels, strict=True)]
    losses = [math.log(sum(math.exp(v) for v in row)) - row[y] for row, y in zip(logits, labels, strict=True)]
    n = len(labels)
    return {"val_acc1": 100 * sum(r < 1 for r in ranks) / n, "val_acc5": 100 * sum(r < 5 for r in ranks) / n,
            "val_loss": sum(losses) / n, "val_images": n}


def val_batches(checkpoint: Path):
    """The digits' val images as the checkpoint's run validated them (its crop and batches), normalized by hand."""
    from checkpoint import read_checkpoint
    from data import IMAGENET_MEAN, IMAGENET_STD, ImageFolderDataset

    state = read_checkpoint(checkpoint)
    cfg = state["config"]
    val = ImageFolderDataset(DIGITS / "val", state["class_names"], False, cfg["image_size"], seed=0)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for first in range(0, len(val), cfg["batch_size"]):
        items = [val[(0, i)] for i in range(first, min(first + cfg["batch_size"], len(val)))]
        yield (torch.stack([(image.permute(2, 0, 1).float() / 255 - mean) / std for image, _, _ in items]),
               torch.tensor([label for _, label, _ in items]))


def checkpoint_logits(checkpoint: Path, model=None):
    """Logits of each val image and of its mirror image, and the labels: the checkpoint's weights in a network
    built here (or `model`, an export of them)."""
    from checkpoint import read_checkpoint
    from model import ARCHITECTURES

    if model is None:
        state = read_checkpoint(checkpoint)
        model = ARCHITECTURES[state["config"]["arch"]](num_classes=len(state["class_names"]))
        model.load_state_dict(state["model"])
        model.eval()
    logits, mirrored, labels = [], [], []
    # One compute thread, as the tests' training runs use: on a busy machine a second one spins, ten times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            for x, y in val_batches(checkpoint):
                logits.append(model(x).double())
                mirrored.append(model(torch.flip(x, dims=[3])).double())
                labels.append(y)
    finally:
        torch.set_num_threads(threads)
    return torch.cat(logits), torch.cat(mirrored), torch.cat(labels)
