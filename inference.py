"""What app.py, predict.py, evaluate.py and export.py share: turn a train.py checkpoint (or a model that
export.py wrote: .safetensors weights or .onnx) into an eval-mode classifier with readable class labels, and
turn one image file into the exact input that validation feeds the network.

A classifier is only ever built from a file whose weights load completely (strict state_dict loading), so no
code path can end up predicting with randomly initialised weights.
"""

import importlib
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageCms, ImageOps

from checkpoint import read_checkpoint
from data import BAD_IMAGE_ERRORS, Normalizer, center_crop_box, decode_region
from model import ARCHITECTURES, narrowed_to

EXIT_BAD_INPUT = 2  # as in train.py: the user can fix it (a path, a file, a flag)
WNID = re.compile(r"n\d{8}")
# PIL only warns between MAX_IMAGE_PIXELS and twice that; we refuse from the limit on, before decoding.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS
ORIENTATION_TAG = 0x0112
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
TRANSPARENT_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
WEIGHTS_FILE = "model.safetensors"  # the name export.py space gives the weights, and where app.py looks first
ZIP_MAGIC = b"PK\x03\x04"  # torch.save has written zip archives since torch 1.6
LFS_POINTER = b"version https://git-lfs.github.com/spec/"
ACCEPTED = ("--checkpoint takes a train.py checkpoint (checkpoint.pth, a torch.save zip archive) or a model "
            "export.py wrote (.safetensors or .onnx)")


class InferenceError(Exception):
    """A problem the user can fix (a missing or unreadable file); the message says what it is."""


def install_hint() -> str:
    """The command that installs the optional packages. A Space folder written by export.py has only its own
    requirements.txt, so the hint names whichever file sits beside this module."""
    in_repository = Path(__file__).with_name("requirements-app.txt").is_file()
    return f"pip install -r {'requirements-app.txt' if in_repository else 'requirements.txt'}"


def require(*modules: str, what: str) -> None:
    """InferenceError naming the requirements file unless every module imports; for the optional packages,
    so that a missing one is a line saying what to install rather than a traceback halfway through."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise InferenceError(f"{what} needs the {name} package, which is not installed: {install_hint()}") from err


@dataclass
class Classifier:
    model: torch.nn.Module  # eval mode
    class_names: list[str]  # the class folders it was trained on, in label order
    labels: list[str]  # what a person is shown for each class
    image_size: int
    arch: str
    source: Path
    config: dict = field(default_factory=dict)  # train.py's settings; empty for exported models
    history: list[dict] = field(default_factory=list)  # train.py's per-epoch metrics; empty for exported models
    epoch_finished: bool = False  # the weights are those of the end of an epoch, so history[-1] describes them
    onnx: bool = False
    pruned: dict | None = None  # prune.py's record for a channel-pruned network (and runs fine-tuned from one)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu") if self.onnx else next(self.model.parameters()).device

    def to(self, device: torch.device) -> "Classifier":
        if not self.onnx:
            self.model.to(device)
        return self

    @torch.no_grad()
    def top_k(self, images: np.ndarray, k: int = 5) -> list[list[tuple[str, float]]]:
        """Per image of an NHWC uint8 batch (from load_image): the k most probable (label, probability)."""
        x = Normalizer(self.device)(torch.from_numpy(images))
        probs = self.model(x).float().softmax(dim=1)
        values, indices = probs.topk(min(k, probs.shape[1]), dim=1)
        return [[(self.labels[i], p) for i, p in zip(row_i.tolist(), row_p.tolist(), strict=True)]
                for row_i, row_p in zip(indices, values, strict=True)]


def display_labels(class_names: list[str]) -> list[str]:
    """ImageNet-1K's wnids become the names torchvision ships (in sorted-wnid order, as our labels are; all
    1000 distinct); any other class set keeps its folder names."""
    if len(class_names) != 1000 or class_names != sorted(class_names) or not all(map(WNID.fullmatch, class_names)):
        return list(class_names)
    from torchvision.models import ResNet50_Weights  # the metadata is bundled; no weights are downloaded

    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def file_kind(path: Path) -> str | None:
    """"checkpoint", "safetensors" or "onnx" from the file's first bytes, or None for none of them. The name
    can lie, and torch.load given a text file fails with a bare KeyError that tells the user nothing."""
    with open(path, "rb") as f:
        head = f.read(16)
        size = os.fstat(f.fileno()).st_size
    if head.startswith(ZIP_MAGIC):
        return "checkpoint"
    # safetensors: an 8-byte little-endian header length, then that many bytes of JSON. Checking that the
    # length fits inside the file keeps random bytes from passing for a header.
    if len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    if path.suffix in (".onnx", ".safetensors"):  # protobuf has no magic number; a damaged file gets its reader's error
        return path.suffix[1:]
    return None


def not_a_model(path: Path) -> InferenceError:
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head:
        what = "it is empty (0 bytes)"
    elif head.startswith(LFS_POINTER):
        what = "it is a Git LFS pointer, not the file it points to (run `git lfs pull`)"
    elif b"\0" not in head and head.decode("utf-8", errors="replace")[:-1].count("\ufffd") == 0:
        what = "it holds text"  # [:-1]: a character cut off by the 4096-byte sample is not a sign of binary data
    else:
        what = "its content is none of the accepted formats"
    return InferenceError(f"{path} is not a model file: {what}. {ACCEPTED}.")


def load_classifier(path: str | os.PathLike, weight_average: bool = False) -> Classifier:
    """A train.py checkpoint (.pth) or a model export.py wrote (.safetensors, .onnx), on the CPU, in eval mode.
    weight_average: the checkpoint's exponential moving average of the weights (train.py --ema-decay)."""
    path = Path(path)
    if not path.is_file():
        raise InferenceError(f"No model file at {path}. Pass the checkpoint.pth that train.py wrote "
                             f"(e.g. runs/demo/checkpoint.pth after `python train.py --demo`) or an export.py "
                             f".safetensors or .onnx file.")
    kind = file_kind(path)
    if kind is None:
        raise not_a_model(path)
    if kind != "checkpoint" and weight_average:
        raise InferenceError(f"{path} is an exported model; the weight average exists only in checkpoints.")
    if kind == "onnx":
        return load_onnx(path)
    if kind == "safetensors":
        return load_safetensors(path)
    try:
        state = read_checkpoint(path)
    except Exception as err:  # torch.load fails in many ways on a damaged file; every one means "unusable"
        raise InferenceError(f"{path} is not a readable train.py checkpoint ({type(err).__name__}: "
                             f"{str(err)[:300]}).") from err
    if weight_average and not state.get("ema"):
        raise InferenceError(f"{path} holds no weight average: the run was trained without --ema-decay.")
    arch, class_names = state["config"].get("arch"), state["class_names"]
    pruned = state.get("pruned")
    model = build_model(path, arch, class_names, state["ema" if weight_average else "model"], pruned is not None)
    return Classifier(model, list(class_names), display_labels(class_names),
                      # the size train.py validated at, which is what the weights are scored for
                      int(state["config"].get("eval_image_size") or state["config"]["image_size"]),
                      arch, path, dict(state["config"]), list(state.get("history", [])), state["samples_done"] == 0,
                      pruned=pruned)


def build_model(path: Path, arch: str | None, class_names: list[str], weights: dict,
                pruned: bool = False) -> torch.nn.Module:
    """The network with every parameter and buffer taken from weights (strict: none keeps its random initial
    value), in eval mode. Half-precision weights are widened to the model's float32 as they are copied.
    pruned: the file says prune.py narrowed the network, so its layers take their widths from the weights; any
    other file must fit the architecture's own shapes."""
    if arch not in ARCHITECTURES:
        raise InferenceError(f"{path} holds an unknown architecture {arch!r}; this code knows {list(ARCHITECTURES)}.")
    model = ARCHITECTURES[arch](num_classes=len(class_names))
    try:
        if pruned:
            narrowed_to(model, weights)
        model.load_state_dict(weights, strict=True)
    except (RuntimeError, KeyError) as err:
        raise InferenceError(f"The weights in {path} do not fit a {arch} with {len(class_names)} classes: "
                             f"{str(err)[:300]}") from err
    return model.eval()


def load_safetensors(path: Path) -> Classifier:
    """Weights written by export.py space: the tensors, and in the file's metadata (a str -> str map) the
    architecture, the image size and the class names as a JSON list, so the file alone describes the model."""
    require("safetensors", what=f"Loading {path.name}")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            weights = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as err:  # safetensors reports every kind of damage as its own SafetensorError
        raise InferenceError(f"{path} is not a readable .safetensors file ({type(err).__name__}: "
                             f"{str(err)[:300]}).") from err
    try:
        class_names = json.loads(meta["class_names"])
        image_size = int(meta["image_size"])
        arch = meta["arch"]
        if not (isinstance(class_names, list) and all(isinstance(c, str) for c in class_names) and image_size > 0):
            raise ValueError("class_names must be a list of strings and image_size positive")
    except (KeyError, ValueError) as err:  # json.JSONDecodeError is a ValueError
        raise InferenceError(f"{path} lacks the class names, image size and architecture that export.py space "
                             f"stores in its metadata ({type(err).__name__}: {err}); write it with "
                             f"`python export.py space`.") from err
    pruned = json.loads(meta["pruned"]) if "pruned" in meta else None
    return Classifier(build_model(path, arch, class_names, weights, pruned is not None), class_names,
                      display_labels(class_names), image_size, arch, path, pruned=pruned)


class OnnxModule(torch.nn.Module):
    """An onnxruntime session behind the nn.Module call interface, so engine.evaluate_models can score exported and
    quantized models with the very code that scored the checkpoint."""

    def __init__(self, session):
        super().__init__()
        self.session = session
        self.input_name = session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input_name: x.float().contiguous().cpu().numpy()})[0])


def onnx_session(path: Path, threads: int | None = None):
    require("onnxruntime", what=f"Loading {path.name}")
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def load_onnx(path: Path) -> Classifier:
    require("onnxruntime", what=f"Loading {path.name}")  # before the try below, which reads any error as damage
    try:
        session = onnx_session(path)
    except Exception as err:  # onnxruntime raises its own exception types for unreadable or invalid files
        raise InferenceError(f"{path} is not a readable ONNX model ({type(err).__name__}: {str(err)[:300]}).") from err
    meta = session.get_modelmeta().custom_metadata_map
    if not {"class_names", "image_size", "arch"} <= meta.keys():
        raise InferenceError(f"{path} lacks the class names and image size that export.py stores; "
                             f"export it with export.py.")
    class_names = json.loads(meta["class_names"])
    return Classifier(OnnxModule(session).eval(), class_names, display_labels(class_names), int(meta["image_size"]),
                      meta["arch"], path, onnx=True)


# ------------------------------------------------------------------------------------------- images

def to_rgb(img: Image.Image) -> Image.Image:
    """Any mode PIL opens, as 8-bit RGB the way an image viewer would show it."""
    img = ImageOps.exif_transpose(img)
    if img.mode in SIXTEEN_BIT_MODES:
        # 16-bit grayscale: scale 0..65535 down; PIL's convert would clip everything above 255 to white.
        scaled = np.asarray(img, dtype=np.float64) / 257
        img = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        values = np.asarray(img, dtype=np.float64)
        scaled = values * 255 if values.max(initial=0) <= 1 else values
        img = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")
    elif img.mode == "CMYK" and img.info.get("icc_profile"):
        # Print files: PIL's formula conversion ignores the ink profile and gives washed-out colours.
        profile = ImageCms.ImageCmsProfile(io.BytesIO(img.info["icc_profile"]))
        return ImageCms.profileToProfile(img, profile, ImageCms.createProfile("sRGB"), outputMode="RGB")
    if img.mode in TRANSPARENT_MODES or "transparency" in img.info:
        # Transparent pixels hold arbitrary colours (often black); show them on white, as viewers do.
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path: str | os.PathLike, image_size: int) -> np.ndarray:
    """One image file as the HWC uint8 array validation would feed the network (resize to image_size/0.875,
    center crop). Plain RGB and grayscale files go through data.decode_region itself, so they match
    evaluate.py exactly; other modes are converted first (see to_rgb). Raises InferenceError for anything
    that is not a usable image."""
    name = Path(path).name
    try:
        if os.path.getsize(path) == 0:
            raise InferenceError(f"{name} is empty (0 bytes).")
        with Image.open(path) as img:
            width, height = img.size
            if width * height > MAX_PIXELS:
                raise InferenceError(f"{name} is {width} x {height} pixels, more than the {MAX_PIXELS:,} this "
                                     f"accepts (a decompression bomb, or a scan far larger than needed).")
            plain = (img.mode in ("RGB", "L") and "transparency" not in img.info
                     and img.getexif().get(ORIENTATION_TAG, 1) == 1)
            if not plain:
                rgb = to_rgb(img)
        if plain:
            crop = decode_region(os.fsencode(path), lambda w, h: center_crop_box(w, h, image_size), image_size)
        else:
            left, top, w, h = center_crop_box(*rgb.size, image_size)
            crop = rgb.resize((image_size, image_size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
        return np.array(crop, dtype=np.uint8)
    except (*BAD_IMAGE_ERRORS, ImageCms.PyCMSError) as err:
        message = str(err) or "no details"
        if isinstance(err, Image.UnidentifiedImageError):
            message = "not an image format this reads (JPEG, PNG, WebP, BMP, TIFF, GIF ...)"
        raise InferenceError(f"{name} is not a usable image: {message}") from err
