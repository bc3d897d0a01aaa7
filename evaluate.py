"""Top-1, top-5 and loss of a trained model on a val folder, with exactly the code train.py validates with.

    python evaluate.py --checkpoint runs/demo/checkpoint.pth --data-dir data/digits
    python evaluate.py --checkpoint runs/resnet50/checkpoint.pth --data-dir /mnt/imagenet/extracted --tta-flip --json
    torchrun --nproc_per_node=8 evaluate.py --checkpoint ...   # several GPUs; every image counted exactly once
    python evaluate.py --checkpoint model.int8.onnx --data-dir ...   # models written by export.py (CPU)

--data-dir is the dataset root train.py takes; its val/ is used. With the checkpoint's image size and
precision (the defaults) the top-1 equals the val_acc1 train.py logged for that epoch.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from config import UsageError
from data import ImageFolderDataset, Normalizer, ValBatchSampler, make_loader
from dataset_paths import class_folders, count_images
from engine import evaluate_models, split_cores, worker_signal_handling
from inference import EXIT_BAD_INPUT, Classifier, InferenceError, load_classifier
from runtime import AMP_DTYPES, Runtime, is_master_process, resolve_device, resolve_precision, setup_distributed


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="a train.py checkpoint.pth, or an export.py .safetensors or .onnx file")
    parser.add_argument("--data-dir", help="dataset root holding val/<class>/ (default: the one the checkpoint was "
                                           "trained on)")
    parser.add_argument("--image-size", type=int, help="crop size as in train.py: resize to size / 0.875, center "
                                                       "crop (default: the training size)")
    parser.add_argument("--batch-size", type=int, help="images per process and step (default: the training one)")
    parser.add_argument("--workers", type=int, default=-1, help="loader processes; -1: the CPU cores divided among "
                                                                "the local processes")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="cuda if available, else cpu")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                        help="auto: as train.py (bf16 where the GPU supports it, else fp16; fp32 on CPU)")
    parser.add_argument("--tta-flip", action=argparse.BooleanOptionalAction,
                        help="average the logits of each image and its mirror image (default: as the run validated, "
                             "train.py --eval-flip)")
    parser.add_argument("--ema", action="store_true", help="evaluate the checkpoint's weight average (train.py "
                                                          "--ema-decay) instead of its weights")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    for name in ("image_size", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    return args


def check_val_folder(data_dir: Path, class_names: list[str]) -> int:
    """The number of val images; InferenceError unless data_dir/val holds exactly the model's classes."""
    val = data_dir / "val"
    if not val.is_dir():
        raise InferenceError(f"{val} does not exist. --data-dir must be a dataset root holding val/<class>/ "
                             f"images, the folder train.py was given.")
    found = class_folders(val)
    if found != class_names:
        missing, extra = sorted(set(class_names) - set(found)), sorted(set(found) - set(class_names))
        raise InferenceError(f"{val} holds {len(found)} class folders, the model knows {len(class_names)} classes; "
                             f"missing: {missing[:5]}{' ...' if len(missing) > 5 else ''}, unknown: "
                             f"{extra[:5]}{' ...' if len(extra) > 5 else ''}. Use the dataset it was trained on.")
    images = count_images(val, found)
    if images == 0:
        raise InferenceError(f"{val} has class folders but no images in them.")
    return images


def amp_dtype_for(precision: str, device: torch.device, onnx: bool) -> torch.dtype | None:
    """The autocast dtype train.py would use for this --precision on this device (None: fp32)."""
    if onnx:
        if precision not in ("auto", "fp32"):
            raise InferenceError("An ONNX model runs in the precision it was exported in; leave out --precision.")
        return None
    return AMP_DTYPES[resolve_precision(precision, device)]


def evaluate_classifier(clf: Classifier, data_dir: Path, image_size: int, batch_size: int, workers: int,
                        rt: Runtime, amp_dtype: torch.dtype | None = None, flip: bool = False) -> dict:
    """train.py's validation over data_dir/val, this process's share of it, summed over all ranks."""
    dataset = ImageFolderDataset(data_dir / "val", clf.class_names, False, image_size, seed=0)
    device = rt.device if not clf.onnx else torch.device("cpu")
    loader = make_loader(dataset, ValBatchSampler(len(dataset), batch_size, rt.rank, rt.world_size), workers,
                         device.type == "cuda", worker_signal_handling, processes=rt.local_world_size)
    clf.to(device)
    if device.type == "cuda" and not clf.onnx:
        # As train.py runs it: another memory layout picks other kernels, and in bf16 that moves near-ties.
        clf.model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    return evaluate_models([clf.model], loader, Normalizer(device), amp_dtype, flip=flip)[0]


def run(args: argparse.Namespace, rt: Runtime) -> dict:
    clf = load_classifier(args.checkpoint, weight_average=args.ema)
    if not args.data_dir and "data_dir" not in clf.config:
        raise InferenceError(f"{clf.source} does not record its dataset; pass --data-dir.")
    data_dir = Path(args.data_dir or clf.config["data_dir"])
    expected = check_val_folder(data_dir, clf.class_names)
    image_size = args.image_size or clf.image_size
    # The training batch size by default: the same batches give bit-identical logits, hence the logged top-1.
    batch_size = args.batch_size or clf.config.get("batch_size", 100)
    amp_dtype = amp_dtype_for(args.precision, rt.device, clf.onnx)
    flip = clf.config.get("eval_flip", False) if args.tta_flip is None else args.tta_flip
    metrics = evaluate_classifier(clf, data_dir, image_size, batch_size, split_cores(args.workers, rt), rt,
                                  amp_dtype, flip)
    if metrics["val_images"] + metrics["val_skipped"] != expected:
        raise RuntimeError(f"Counted {metrics['val_images']} + {metrics['val_skipped']} unreadable images, "
                           f"expected {expected}: the split across processes lost or repeated some.")
    logged = None
    same_as_training = image_size == clf.image_size and flip == clf.config.get("eval_flip", False)
    if clf.history and clf.epoch_finished and same_as_training:
        logged = clf.history[-1]["ema_val_acc1" if args.ema else "val_acc1"]
    return {"acc1": metrics["val_acc1"], "acc5": metrics["val_acc5"], "loss": metrics["val_loss"],
            "images": metrics["val_images"], "unreadable_images": metrics["val_skipped"],
            "checkpoint": str(clf.source), "arch": clf.arch, "data_dir": str(data_dir), "image_size": image_size,
            "tta_flip": flip, "weight_average": args.ema, "device": rt.device.type,
            "processes": rt.world_size,
            "precision": {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype],
            "logged_val_acc1": logged}


def report(result: dict) -> str:
    lines = [f"{result['arch']} from {result['checkpoint']} on {result['data_dir']}/val: {result['images']:,} images "
             f"at {result['image_size']} px{', flip TTA' if result['tta_flip'] else ''}"
             f"{', weight average' if result['weight_average'] else ''}, {result['precision']}, "
             f"{result['processes']} x {result['device']}",
             f"top-1 {result['acc1']:.2f}%  top-5 {result['acc5']:.2f}%  loss {result['loss']:.4f}"]
    if result["unreadable_images"]:
        lines.append(f"{result['unreadable_images']} unreadable images were left out (listed above).")
    if result["logged_val_acc1"] is not None:
        lines.append(f"train.py logged val top-1 {result['logged_val_acc1']:.2f}% for these weights.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        result = run(args, setup_distributed(resolve_device(args.device)))
    except (InferenceError, UsageError) as err:
        if is_master_process():
            print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    # Only after a clean run: after an error the other processes may wait in a collective this one never joins,
    # and since torch 2.6 destroying NCCL communicators waits for all of them (see train.main).
    if dist.is_initialized():
        dist.destroy_process_group()
    if is_master_process():
        print(json.dumps(result) if args.json else report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
