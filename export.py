"""Export a train.py checkpoint for deployment and check each export against PyTorch.

    python export.py torchscript --checkpoint runs/demo/checkpoint.pth        # -> runs/demo/resnet26_narrow.pt
    python export.py onnx --checkpoint runs/demo/checkpoint.pth               # -> runs/demo/resnet26_narrow.onnx
    python export.py quantize --checkpoint runs/demo/checkpoint.pth --data-dir data/digits
                                                               # -> resnet26_narrow.onnx and resnet26_narrow.int8.onnx
    python export.py space --checkpoint runs/resnet50/checkpoint.pth --out space [--fp16] [--push USER/NAME]
                                                               # -> a Hugging Face Space folder, optionally uploaded

Every export is run on the same batch as the PyTorch model and the largest absolute difference of the logits
is reported; above --tolerance the command fails. The models take what the checkpoint takes: float32
N x 3 x S x S images, normalized with the ImageNet mean and std (inference.load_image + data.Normalizer), and
return logits. The ONNX files carry the class names and image size as metadata, so evaluate.py and predict.py
accept them in place of a checkpoint.

quantize is post-training static int8 quantization for CPU inference with onnxruntime (per-channel int8
weights, uint8 activations, ranges calibrated on --calibration-images train images). It then scores the fp32
checkpoint and the int8 model on the val folder with evaluate.py's code and times both: the accuracy change and
the speed-up are printed, not assumed. torch.ao.quantization is not used: torch has deprecated it in favour of
torchao, and the onnxruntime model is what a CPU deployment runs anyway.

space writes a folder that is a complete Gradio Space: app.py and the modules it imports (found by reading
their import statements, so nothing of training comes along), a requirements.txt for CPU serving, a README.md
with the Space's front matter, class_names.json, LICENSE, and model.safetensors: the weights alone (no
optimizer state or history), optionally in fp16 for half the download, with the architecture, class names and
image size in the file's metadata. The weights are read back through app.py's loader and compared with the
checkpoint before anything is pushed. --push USER/NAME creates the Space if needed and uploads the folder with
huggingface_hub (the token: $HF_TOKEN, else the one `hf auth login` saved).
"""

import argparse
import ast
import importlib.metadata
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import evaluate
from data import ImageFolderDataset, Normalizer
from dataset_paths import class_folders
from engine import loader_workers
from inference import (
    EXIT_BAD_INPUT,
    WEIGHTS_FILE,
    Classifier,
    InferenceError,
    install_hint,
    load_classifier,
    onnx_session,
    require,
)
from runtime import Runtime

EXIT_PARITY = 1
PARITY_BATCH = 8
ROOT = Path(__file__).resolve().parent
INPUT = "float32 N x 3 x S x S, RGB, (pixel / 255 - ImageNet mean) / ImageNet std"
FP32_TOLERANCE = 1e-3
# fp16 weights (11 significant bits) moved the logits by about 1e-3 of their largest magnitude, measured on the
# demo network and on a ResNet-50 with random weights and BatchNorm statistics; a trained ResNet-50's logits
# reach about 30, so 0.05 leaves a few times the expected change, and a broken conversion is far above it.
FP16_TOLERANCE = 0.05
# What the Space installs, in this order; the version bounds are copied from this repository's requirement
# files so the Space runs what the tests ran.
SPACE_PACKAGES = ("torch", "torchvision", "numpy", "pillow", "simplejpeg", "safetensors", "gradio")
# Spaces install requirements.txt with pip; PyPI's Linux torch wheels bundle CUDA (gigabytes) that a CPU
# Space never uses, the CPU builds from this index are a fraction of that.
CPU_WHEELS = "https://download.pytorch.org/whl/cpu"
REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def repo_id(value: str) -> str:
    if not REPO_ID.fullmatch(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a Space name of the form USER/NAME")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--checkpoint", required=True, help="a checkpoint.pth written by train.py")
    common.add_argument("--output", help="file to write (default: beside the checkpoint, named after the network)")
    common.add_argument("--tolerance", type=float, default=1e-3,
                        help="largest allowed |logit difference| between the export and PyTorch (default: 1e-3)")
    common.add_argument("--json", action="store_true", help="print one JSON object with the results")
    sub.add_parser("torchscript", parents=[common], help="torch.jit.trace the model and save it (.pt)")
    onnx_parser = sub.add_parser("onnx", parents=[common], help="export to ONNX and check it with onnxruntime")
    quant = sub.add_parser("quantize", parents=[common], help="int8 ONNX for CPUs, with its accuracy and speed "
                                                              "measured against fp32")
    for p in (onnx_parser, quant):
        p.add_argument("--opset", type=int, default=17, help="ONNX opset version (default: 17)")
    quant.add_argument("--data-dir", required=True, help="dataset root: train/ images calibrate, val/ measures")
    quant.add_argument("--calibration-images", type=int, default=512, help="train images that set the int8 ranges")
    quant.add_argument("--format", default="qoperator", choices=["qoperator", "qdq"],
                       help="qoperator: fused int8 operators (fastest on onnxruntime's CPU provider); qdq: "
                            "QuantizeLinear/DequantizeLinear pairs, for runtimes that fuse them themselves")
    quant.add_argument("--int8-tolerance", type=float, default=None,
                       help="fail if the int8 top-1 is more than this many points below fp32 (default: only report)")
    quant.add_argument("--timing-runs", type=int, default=20, help="timed runs per model and batch size")
    quant.add_argument("--batch-size", type=int, default=32, help="the larger of the two timed batch sizes")
    space = sub.add_parser("space", help="a Hugging Face Space folder: the demo app and the weights as .safetensors")
    space.add_argument("--checkpoint", required=True, help="a checkpoint.pth written by train.py")
    space.add_argument("--out", "--output", dest="output", metavar="DIR",
                       help="the folder to write; must be new or empty (default: space/ beside the checkpoint)")
    space.add_argument("--fp16", action="store_true", help="store the weights in half precision: half the download; "
                                                           "the app computes in float32 either way")
    space.add_argument("--push", type=repo_id, metavar="USER/NAME",
                       help="then create the Space USER/NAME if needed and upload the folder to it")
    space.add_argument("--tolerance", type=float, default=None,
                       help=f"largest allowed |logit difference| between the reloaded weights and the checkpoint "
                            f"(default: {FP32_TOLERANCE}, with --fp16 {FP16_TOLERANCE})")
    space.add_argument("--json", action="store_true", help="print one JSON object with the results")
    return parser.parse_args(argv)


def parity_batch(clf: Classifier, size: int = PARITY_BATCH) -> torch.Tensor:
    """Fixed random images, normalized as real ones are: the whole uint8 input range, reproducibly."""
    images = torch.randint(0, 256, (size, clf.image_size, clf.image_size, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    return Normalizer(torch.device("cpu"))(images).contiguous()


def default_output(clf: Classifier, suffix: str) -> Path:
    return clf.source.with_name(clf.arch + suffix)


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@torch.no_grad()
def export_torchscript(clf: Classifier, path: Path) -> float:
    x = parity_batch(clf)
    with warnings.catch_warnings():
        # torch.jit is deprecated in favour of torch.export, but TorchScript is still what C++ (libtorch) and
        # older serving stacks load; the warning would only repeat that on every export.
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
        traced = torch.jit.trace(clf.model, x)
        extra = {"class_names.json": json.dumps(clf.class_names), "image_size": str(clf.image_size),
                 "arch": clf.arch}
        torch.jit.save(traced, str(path), _extra_files=extra)
        loaded = torch.jit.load(str(path), map_location="cpu")
    return max_abs_diff(loaded(x), clf.model(x))


def write_metadata(path: Path, clf: Classifier, precision: str) -> None:
    import onnx

    model = onnx.load(str(path))
    meta = {"class_names": json.dumps(clf.class_names), "image_size": str(clf.image_size), "arch": clf.arch,
            "precision": precision, "source_checkpoint": clf.source.name, "input": INPUT}
    del model.metadata_props[:]
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


@torch.no_grad()
def export_onnx(clf: Classifier, path: Path, opset: int) -> float:
    x = parity_batch(clf)
    with warnings.catch_warnings():
        # The torch.export-based exporter (the default since torch 2.9) needs onnxscript and takes about a
        # minute for even the smallest network on two cores; the TorchScript-based one handles a plain CNN in
        # seconds and is still supported, only announced as deprecated.
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*legacy TorchScript-based ONNX")
        torch.onnx.export(clf.model, (x,), str(path), dynamo=False, opset_version=opset, input_names=["images"],
                          output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    write_metadata(path, clf, "fp32")
    exported = onnx_session(path).run(None, {"images": x.numpy()})[0]
    return max_abs_diff(torch.from_numpy(exported), clf.model(x))


class CalibrationImages:
    """onnxruntime's CalibrationDataReader protocol: batches of train images under the val transform (what
    the model sees at inference), spread evenly over the sorted train list so every class is represented."""

    def __init__(self, data_dir: Path, clf: Classifier, count: int, batch: int = 32):
        train_dir = data_dir / "train"
        if not train_dir.is_dir() or class_folders(train_dir) != clf.class_names:
            raise InferenceError(f"{train_dir} must hold the model's {len(clf.class_names)} class folders; "
                                 f"its images calibrate the int8 ranges.")
        self.dataset = ImageFolderDataset(train_dir, clf.class_names, False, clf.image_size, seed=0)
        picks = np.unique(np.linspace(0, len(self.dataset) - 1, min(count, len(self.dataset))).astype(int))
        self.count = len(picks)
        self.batches = iter([picks[i:i + batch] for i in range(0, len(picks), batch)])
        self.normalize = Normalizer(torch.device("cpu"))

    def get_next(self) -> dict | None:
        indices = next(self.batches, None)
        if indices is None:
            return None
        items = [self.dataset[(0, int(i))] for i in indices]
        good = [image for image, label, _ in items if label >= 0]  # unreadable files come back labelled -1
        return {"images": self.normalize(torch.stack(good)).contiguous().numpy()}


def quantize_onnx(fp32_path: Path, int8_path: Path, calibration: CalibrationImages, fmt: str) -> None:
    import onnxruntime.quantization as ortq

    class Reader(ortq.CalibrationDataReader):
        def get_next(self):
            return calibration.get_next()

    with tempfile.TemporaryDirectory() as tmp:
        # Shape inference and graph optimisation first (folds BatchNorm into the convolutions), as
        # onnxruntime recommends before quantizing.
        prepared = Path(tmp) / "prepared.onnx"
        ortq.quant_pre_process(str(fp32_path), str(prepared))
        ortq.quantize_static(str(prepared), str(int8_path), Reader(),
                             quant_format=ortq.QuantFormat.QOperator if fmt == "qoperator" else ortq.QuantFormat.QDQ,
                             per_channel=True, activation_type=ortq.QuantType.QUInt8,
                             weight_type=ortq.QuantType.QInt8)


def milliseconds_per_image(run, images: int, runs: int) -> float:
    for _ in range(3):  # warm-up: allocations, kernel selection
        run()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times) / images


@torch.no_grad()
def time_one_batch(model: torch.nn.Module, fp32, int8, x: torch.Tensor, runs: int) -> dict:
    feed = {"images": x.numpy()}
    return {"pytorch_fp32_ms": milliseconds_per_image(lambda: model(x), len(x), runs),
            "onnxruntime_fp32_ms": milliseconds_per_image(lambda: fp32.run(None, feed), len(x), runs),
            "onnxruntime_int8_ms": milliseconds_per_image(lambda: int8.run(None, feed), len(x), runs)}


def timings(clf: Classifier, fp32_path: Path, int8_path: Path, batch_size: int, runs: int) -> dict:
    fp32, int8 = onnx_session(fp32_path), onnx_session(int8_path)
    return {f"batch_{n}": time_one_batch(clf.model, fp32, int8, parity_batch(clf, n), runs)
            for n in sorted({1, batch_size})}


def quantize(clf: Classifier, args: argparse.Namespace) -> dict:
    data_dir = Path(args.data_dir)
    evaluate.check_val_folder(data_dir, clf.class_names)
    calibration = CalibrationImages(data_dir, clf, args.calibration_images)
    int8_path = Path(args.output) if args.output else default_output(clf, ".int8.onnx")
    if not int8_path.parent.is_dir():
        raise InferenceError(f"Cannot write {int8_path}: the folder {int8_path.parent} does not exist.")
    fp32_path = int8_path.with_name(int8_path.name.replace(".int8", "") if ".int8" in int8_path.name
                                    else int8_path.stem + ".fp32.onnx")
    fp32_diff = export_onnx(clf, fp32_path, args.opset)
    if fp32_diff > args.tolerance:
        raise ParityError(f"The fp32 ONNX model differs from PyTorch by {fp32_diff:.3g} > {args.tolerance}.")
    quantize_onnx(fp32_path, int8_path, calibration, args.format)
    write_metadata(int8_path, clf, "int8")
    int8 = load_classifier(int8_path)
    x = parity_batch(clf)
    with torch.no_grad():
        int8_diff = max_abs_diff(int8.model(x), clf.model(x))
    batch = clf.config.get("batch_size", 100)
    cpu = Runtime()
    scores = {name: evaluate.evaluate_classifier(model, data_dir, clf.image_size, batch, loader_workers(-1, cpu), cpu)
              for name, model in (("fp32", clf), ("int8", int8))}
    result = {"fp32_onnx": str(fp32_path), "int8_onnx": str(int8_path), "fp32_onnx_max_abs_diff": fp32_diff,
              "int8_max_abs_diff": int8_diff, "calibration_images": calibration.count,
              "val_images": scores["fp32"]["val_images"], "threads": torch.get_num_threads(),
              "fp32_acc1": scores["fp32"]["val_acc1"], "int8_acc1": scores["int8"]["val_acc1"],
              "fp32_acc5": scores["fp32"]["val_acc5"], "int8_acc5": scores["int8"]["val_acc5"],
              "acc1_change": scores["int8"]["val_acc1"] - scores["fp32"]["val_acc1"],
              "timings": timings(clf, fp32_path, int8_path, args.batch_size, args.timing_runs),
              "fp32_bytes": fp32_path.stat().st_size, "int8_bytes": int8_path.stat().st_size}
    return result


class ParityError(Exception):
    """An export computes something other than the checkpoint."""


def quantize_report(r: dict) -> str:
    lines = [f"Wrote {r['int8_onnx']} ({r['int8_bytes'] / 1e6:.1f} MB; fp32 {r['fp32_onnx']}, "
             f"{r['fp32_bytes'] / 1e6:.1f} MB), calibrated on {r['calibration_images']} train images.",
             f"fp32 ONNX vs PyTorch: max |logit diff| {r['fp32_onnx_max_abs_diff']:.3g}; int8 vs PyTorch: "
             f"{r['int8_max_abs_diff']:.3g}",
             f"val ({r['val_images']:,} images): top-1 fp32 {r['fp32_acc1']:.2f}% -> int8 {r['int8_acc1']:.2f}% "
             f"({r['acc1_change']:+.2f} points), top-5 {r['fp32_acc5']:.2f}% -> {r['int8_acc5']:.2f}%",
             f"ms per image with {r['threads']} threads (median):"]
    for name, t in r["timings"].items():
        lines.append(f"  {name.replace('_', ' ')}: PyTorch fp32 {t['pytorch_fp32_ms']:.2f}, onnxruntime fp32 "
                     f"{t['onnxruntime_fp32_ms']:.2f}, int8 {t['onnxruntime_int8_ms']:.2f} -> int8 is "
                     f"{t['onnxruntime_fp32_ms'] / t['onnxruntime_int8_ms']:.2f}x onnxruntime fp32, "
                     f"{t['pytorch_fp32_ms'] / t['onnxruntime_int8_ms']:.2f}x PyTorch")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- Space

def local_modules(entry: Path) -> list[Path]:
    """entry and every module of its folder that it imports, directly or through another. Imports inside
    functions count too: a module imported only when some code path runs would otherwise be missing from the
    Space exactly when that path runs."""
    found, todo = set(), [entry]
    while todo:
        path = todo.pop()
        if path in found:
            continue
        found.add(path)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            todo += [path.parent / f"{n.split('.')[0]}.py" for n in names
                     if (path.parent / f"{n.split('.')[0]}.py").is_file()]
    return sorted(found)


def requirement_lines(packages: tuple[str, ...]) -> list[str]:
    """This repository's requirement line (with its bounds) for each package, in the order given."""
    lines = {}
    for name in ("requirements.txt", "requirements-app.txt"):
        for line in (ROOT / name).read_text().splitlines():
            if line.strip() and not line.lstrip().startswith(("#", "-")):
                lines[re.match(r"[A-Za-z0-9_.-]+", line.strip()).group().lower()] = line.strip()
    return [lines[p] for p in packages]


def save_weights(clf: Classifier, path: Path, fp16: bool) -> None:
    """The model's state_dict alone as safetensors, described by its metadata (a str -> str map, hence JSON for
    the class list) so the file can be loaded without the checkpoint or the folder around it."""
    from safetensors.torch import save_file

    tensors = {name: (t.half() if fp16 and t.is_floating_point() else t).detach().cpu().contiguous()
               for name, t in clf.model.state_dict().items()}
    # "format": "pt" is the key the Hugging Face libraries read to tell PyTorch tensors from other frameworks'.
    meta = {"format": "pt", "arch": clf.arch, "class_names": json.dumps(clf.class_names),
            "image_size": str(clf.image_size), "precision": "fp16" if fp16 else "fp32",
            "source_checkpoint": clf.source.name, "input": INPUT}
    if clf.pruned is not None:  # the loader rebuilds the narrower network from the tensor shapes
        meta["pruned"] = json.dumps(clf.pruned)
    save_file(tensors, str(path), metadata=meta)


def yaml_str(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)  # a JSON string is a YAML string, quoted and escaped


def space_readme(clf: Classifier, gradio_version: str, fp16: bool) -> str:
    classes = len(clf.class_names)
    front = {"title": yaml_str(f"{clf.arch} image classifier"), "emoji": yaml_str("🔎"), "colorFrom": "blue",
             "colorTo": "gray", "sdk": "gradio", "sdk_version": yaml_str(gradio_version), "app_file": "app.py",
             "pinned": "false", "license": "mit",
             "short_description": yaml_str(f"Top-5 of {classes} classes for an uploaded image")}
    lines = ["---", *(f"{k}: {v}" for k, v in front.items()), "---", "",
             f"# {clf.arch} image classifier", "",
             f"Upload an image to see the five most probable of the model's {classes} classes.", ""]
    if clf.history and clf.epoch_finished:
        last = clf.history[-1]
        lines += [f"Trained for {last['epoch']} epochs; top-1 {last['val_acc1']:.2f}%, top-5 {last['val_acc5']:.2f}% "
                  f"on its validation set of {last.get('val_images', '?')} images at {clf.image_size} px.", ""]
    lines += [f"- `{WEIGHTS_FILE}`: the weights alone ({'float16' if fp16 else 'float32'}), with the "
              f"architecture, the class names (as JSON) and the image size in the file's metadata.",
              "- `class_names.json`: the class folders the model was trained on, in label order.",
              f"- Input: the image resized to {clf.image_size} / 0.875 on its short side, centre-cropped to "
              f"{clf.image_size} x {clf.image_size}, normalized with the ImageNet mean and std.", ""]
    if clf.arch == "resnet50" and clf.pruned is None:  # a pruned one has narrower layers than torchvision's
        lines += ["The weights load into torchvision's and timm's ResNet-50 as they are:", "", "```python",
                  "from safetensors.torch import load_file", "import torchvision", "",
                  f"model = torchvision.models.resnet50(num_classes={classes})",
                  f'model.load_state_dict(load_file("{WEIGHTS_FILE}"))  # or timm.create_model("resnet50", '
                  f"num_classes={classes})", "```", ""]
    return "\n".join(lines)


def write_space(clf: Classifier, out: Path, fp16: bool) -> list[str]:
    """The Space folder's files, by name."""
    try:
        gradio_version = importlib.metadata.version("gradio")
    except importlib.metadata.PackageNotFoundError as err:
        raise InferenceError(f"export.py space pins the Space to the gradio installed here, and none is: "
                             f"{install_hint()}") from err
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InferenceError(f"{out} already exists and is not an empty folder. Choose a new --out: every file in "
                             f"the folder is uploaded to the Space, stale ones too.")
    out.mkdir(parents=True, exist_ok=True)
    for module in local_modules(ROOT / "app.py"):
        shutil.copyfile(module, out / module.name)
    shutil.copyfile(ROOT / "LICENSE", out / "LICENSE")  # the MIT licence asks for its notice in every copy
    save_weights(clf, out / WEIGHTS_FILE, fp16)
    (out / "class_names.json").write_text(json.dumps(clf.class_names, indent=0) + "\n")
    (out / "requirements.txt").write_text("\n".join(
        ["# CPU serving: torch's CPU builds, a fraction of the size of PyPI's CUDA wheels.",
         f"--extra-index-url {CPU_WHEELS}", *requirement_lines(SPACE_PACKAGES)]) + "\n")
    (out / "README.md").write_text(space_readme(clf, gradio_version, fp16))
    return sorted(p.name for p in out.iterdir())


def push_space(folder: Path, name: str) -> str:
    """Create the Space if needed and upload the folder as one commit; the URL of the Space."""
    from huggingface_hub import HfApi

    api = HfApi()  # the token: $HF_TOKEN, else the one `hf auth login` saved
    try:
        api.create_repo(name, repo_type="space", space_sdk="gradio", exist_ok=True)
        api.upload_folder(repo_id=name, repo_type="space", folder_path=str(folder),
                          commit_message=f"Upload {WEIGHTS_FILE} and the app from export.py space")
    except OSError as err:  # huggingface_hub's HTTP errors and its missing-token error are OSErrors
        raise InferenceError(f"Could not push {folder} to the Space {name}: {str(err).splitlines()[0]} "
                             f"(log in with `hf auth login` or set HF_TOKEN; the folder is complete, rerun with "
                             f"--push or upload it yourself).") from err
    return f"https://huggingface.co/spaces/{name}"


@torch.no_grad()
def space(clf: Classifier, args: argparse.Namespace) -> dict:
    out = Path(args.output) if args.output else clf.source.with_name("space")
    files = write_space(clf, out, args.fp16)
    x = parity_batch(clf)
    diff = max_abs_diff(load_classifier(out / WEIGHTS_FILE).model(x), clf.model(x))
    tolerance = args.tolerance if args.tolerance is not None else FP16_TOLERANCE if args.fp16 else FP32_TOLERANCE
    if diff > tolerance:
        raise ParityError(f"The weights in {out / WEIGHTS_FILE} compute logits up to {diff:.3g} away from the "
                          f"checkpoint's (> --tolerance {tolerance}); do not deploy them.")
    return {"output": str(out), "files": files, "weights_bytes": (out / WEIGHTS_FILE).stat().st_size,
            "precision": "fp16" if args.fp16 else "fp32", "max_abs_diff": diff, "tolerance": tolerance,
            "parity_images": PARITY_BATCH, "space_url": push_space(out, args.push) if args.push else None}


def space_report(r: dict) -> str:
    lines = [f"Wrote the Space folder {r['output']}: {', '.join(r['files'])} ({WEIGHTS_FILE}: "
             f"{r['weights_bytes'] / 1e6:.1f} MB, {r['precision']}).",
             f"Weights read back vs the checkpoint: max |logit difference| on {r['parity_images']} images "
             f"{r['max_abs_diff']:.3g} (tolerance {r['tolerance']})."]
    if r["space_url"]:
        lines.append(f"Pushed to {r['space_url']}")
    else:
        lines.append(f"Try it: cd {r['output']} && python app.py   Publish it: add --push USER/NAME")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        needs = {"onnx": ("onnx", "onnxruntime"), "quantize": ("onnx", "onnxruntime"),
                 "space": ("safetensors",) + (("huggingface_hub",) if getattr(args, "push", None) else ())}
        require(*needs.get(args.command, ()), what=f"export.py {args.command}")
        clf = load_classifier(args.checkpoint)
        if clf.onnx:
            raise InferenceError("export.py needs the train.py checkpoint.pth, not an exported model.")
        if args.command == "space":
            result = space(clf, args)
            print(json.dumps(result) if args.json else space_report(result))
            return 0
        if args.command == "quantize":
            result = quantize(clf, args)
            if args.int8_tolerance is not None and -result["acc1_change"] > args.int8_tolerance:
                raise ParityError(f"int8 top-1 is {-result['acc1_change']:.2f} points below fp32, more than "
                                  f"--int8-tolerance {args.int8_tolerance}.")
            print(json.dumps(result) if args.json else quantize_report(result))
            return 0
        suffix = {"torchscript": ".pt", "onnx": ".onnx"}[args.command]
        path = Path(args.output) if args.output else default_output(clf, suffix)
        if not path.parent.is_dir():
            raise InferenceError(f"Cannot write {path}: the folder {path.parent} does not exist.")
        diff = export_torchscript(clf, path) if args.command == "torchscript" else export_onnx(clf, path, args.opset)
        result = {"output": str(path), "max_abs_diff": diff, "tolerance": args.tolerance, "parity_images": PARITY_BATCH}
        if diff > args.tolerance:
            raise ParityError(f"{path} differs from the PyTorch model by up to {diff:.3g} > --tolerance "
                              f"{args.tolerance} on {PARITY_BATCH} images; do not deploy it.")
        print(json.dumps(result) if args.json else
              f"Wrote {path}; max |logit difference| vs PyTorch on {PARITY_BATCH} images: {diff:.3g} "
              f"(tolerance {args.tolerance}).")
        return 0
    except InferenceError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ParityError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_PARITY


if __name__ == "__main__":
    sys.exit(main())
