"""Structured (channel) pruning: a trained checkpoint becomes a narrower network of the same ResNet family.

    python prune.py --checkpoint runs/demo/checkpoint.pth --ratio 0.5 --output runs/demo/pruned.pth
    python train.py --demo --init-from runs/demo/pruned.pth --output-dir runs/demo_pruned --epochs 5  # fine-tune

Whole channels go, so the result is a plain dense ResNet with fewer channels per layer that runs faster anywhere
(no sparse kernels needed). Torch-Pruning traces the network into a dependency graph, so the channels that a
residual addition ties together (a stage's block outputs, their shortcut projections and the next blocks' inputs)
are removed together and the additions still line up. The classifier's outputs are never touched.

Importance: the group L2 magnitude of each channel (Torch-Pruning's GroupMagnitudeImportance, p=2), summed over
every weight the channel owns in its dependency group (the producing convolution's filter, its BatchNorm scale
and shift, the consuming layers' input slices) and normalised per group. It needs no data and no gradients, so
pruning is a fast, deterministic function of the weights alone; a channel whose weights are all small
contributes little to any output, and BatchNorm's scale joins the norm so that a channel a BatchNorm has
switched off counts as unimportant. Data-driven criteria (Taylor, Hessian) rank slightly better before
fine-tuning, but fine-tuning (train.py --init-from) recovers the difference, and they would make the result
depend on which batches were seen.

--ratio is the fraction of the parameters to remove. Each pruned layer keeps a fraction k = sqrt(1 - ratio) of
its output channels; a convolution loses channels on both sides, so its weights shrink to about k^2 = 1 - ratio.
The stem's three input channels and the classifier's outputs stay, so the result is a little above the target.

The output is an ordinary weights-only checkpoint (torch.load(..., weights_only=True), like every file here): the
pruned state_dict, the source run's config and class names, and a "pruned" entry that lets every loader rebuild
the narrower network from the tensor shapes (model.narrowed_to). The source's optimizer state, weight average
and training history describe the unpruned weights and are left out.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from checkpoint import write_synced
from config import EXIT_BAD_INPUT, UsageError
from inference import InferenceError, file_kind, load_classifier
from model import MIN_IMAGE_SIZE

# The saved file, loaded back, must give the pruned module's outputs: the tensors are copied exactly, so the
# only allowed difference is float32 round-off of the same arithmetic.
PARITY_TOLERANCE = 1e-4
CRITERION = "group L2 magnitude (torch_pruning GroupMagnitudeImportance, p=2)"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a train.py checkpoint.pth (or a file prune.py wrote)")
    parser.add_argument("--ratio", type=float, required=True,
                        help="fraction of the parameters to remove, between 0 and 1 exclusive (0.5: about half)")
    parser.add_argument("--output", required=True, help="where to write the pruned checkpoint (.pth)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return parser.parse_args(argv)


def torch_pruning():
    """The Torch-Pruning package; requirements.txt installs it, but only this script needs it, so an install
    without it trains and serves models and refuses here in one line."""
    try:
        import torch_pruning
    except ImportError as err:
        raise UsageError(f"prune.py needs Torch-Pruning, which cannot be imported here ({err}). Install it with "
                         f"`pip install 'torch-pruning>=1.5,<2'` (requirements.txt lists it).") from err
    return torch_pruning


def count_macs_and_params(model: torch.nn.Module, image_size: int) -> tuple[int, int]:
    macs, params = torch_pruning().utils.count_ops_and_params(model, torch.zeros(1, 3, image_size, image_size))
    return int(macs), int(params)


def prune_model(model: torch.nn.Module, ratio: float, image_size: int) -> torch.nn.Module:
    """model, pruned in place to about 1 - ratio of its parameters, in eval mode."""
    tp = torch_pruning()
    pruner = tp.pruner.MetaPruner(
        model.eval(), torch.zeros(1, 3, image_size, image_size),
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=1 - math.sqrt(1 - ratio),
        ignored_layers=[model.fc],  # one output per class, always
    )
    pruner.step()
    return model


def check_input(args: argparse.Namespace) -> Path:
    path = Path(args.checkpoint)
    if not 0 < args.ratio < 1:
        raise UsageError(f"--ratio {args.ratio} is outside (0, 1): it is the fraction of the parameters to remove, "
                         f"e.g. 0.5 for about half.")
    if path.is_file() and file_kind(path) in ("onnx", "safetensors"):
        raise UsageError(f"{path} is not a train.py checkpoint; prune.py needs the checkpoint.pth of a training "
                         f"run (an exported .onnx or .safetensors model cannot be fine-tuned afterwards).")
    return path


def prune_checkpoint(args: argparse.Namespace) -> dict:
    path = check_input(args)
    torch_pruning()  # before any work
    clf = load_classifier(path)
    source = torch.load(path, map_location="cpu", weights_only=True)
    image_size = max(clf.image_size, MIN_IMAGE_SIZE)
    macs_before, params_before = count_macs_and_params(clf.model, image_size)
    pruned = prune_model(clf.model, args.ratio, image_size)
    macs_after, params_after = count_macs_and_params(pruned, image_size)
    state = {
        "model": pruned.state_dict(),
        "optimizer": {}, "ema": None, "grad_scaler": {}, "history": [],
        "epoch": source["epoch"], "samples_done": source["samples_done"],
        "config": source["config"], "class_names": source["class_names"],
        "pruned": {"ratio": args.ratio, "criterion": CRITERION, "source": str(path),
                   "params_before": params_before, "macs_before": macs_before},
        "torch_version": str(torch.__version__),
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_synced(state, output)
    check_parity(pruned, output, image_size)
    return {"checkpoint": str(path), "output": str(output), "ratio": args.ratio, "params_before": params_before,
            "params_after": params_after, "macs_before": macs_before, "macs_after": macs_after}


@torch.no_grad()
def check_parity(pruned: torch.nn.Module, output: Path, image_size: int) -> None:
    """The written file, loaded the way evaluate.py and app.py load it, computes what the pruned module does."""
    x = torch.randn(4, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    diff = (load_classifier(output).model(x) - pruned(x)).abs().max().item()
    if diff > PARITY_TOLERANCE:
        raise RuntimeError(f"{output} reloaded gives logits up to {diff:.3g} away from the pruned network's")


def report(r: dict) -> str:
    params, macs = r["params_after"] / r["params_before"], r["macs_after"] / r["macs_before"]
    return (f"Pruned {r['checkpoint']} (--ratio {r['ratio']}) into {r['output']}\n"
            f"  params: {r['params_before']:,} -> {r['params_after']:,} ({params:.1%})\n"
            f"  MACs per image: {r['macs_before']:,} -> {r['macs_after']:,} ({macs:.1%})\n"
            f"Fine-tune it with: python train.py --init-from {r['output']} --output-dir NEW_RUN_DIR ...")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        result = prune_checkpoint(args)
    except (InferenceError, UsageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(json.dumps(result) if args.json else report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
