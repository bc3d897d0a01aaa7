"""Turn the raw ILSVRC2012 archives into the ImageFolder layout that train.py reads.

    python prepare_imagenet.py --train-tar ILSVRC2012_img_train.tar --val-tar ILSVRC2012_img_val.tar \
        --devkit ILSVRC2012_devkit_t12.tar.gz --out /mnt/imagenet/extracted

produces OUT/train/<wnid>/*.JPEG and OUT/val/<wnid>/*.JPEG, rewrites the few files that are not
RGB/grayscale JPEGs, checks the counts and writes OUT/prepare_report.json. See --help for details.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import re
import shutil
import sys
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from PIL import Image
from tqdm import tqdm

IMAGENET_CLASSES = 1000
IMAGENET_COUNTS = {"train": 1_281_167, "val": 50_000}
WNID_RE = re.compile(r"^n\d{8}$")
VAL_NAME_RE = re.compile(r"^(ILSVRC2012_val_(\d{8}))\.JPEG$")
REPORT_NAME = "prepare_report.json"
# Work in progress and completion markers live outside OUT/train and OUT/val: ImageFolder treats
# every sub-folder (hidden ones included) as a class, so nothing else may sit next to the classes.
STATE_DIR = ".prepare_state"

HELP_EPILOG = f"""
Layout of the inputs (as distributed by image-net.org and Academic Torrents):
  ILSVRC2012_img_train.tar     1000 tars <wnid>.tar, each holding <wnid>_<n>.JPEG
  ILSVRC2012_img_val.tar       50,000 flat files ILSVRC2012_val_00000001.JPEG ...
  ILSVRC2012_devkit_t12.tar.gz data/meta.mat and data/ILSVRC2012_validation_ground_truth.txt
Instead of the devkit, --val-labels-csv accepts Kaggle's LOC_val_solution.csv. Kaggle ships the images
already unpacked: pass its ILSVRC/Data/CLS-LOC/train and .../val folders as --train-tar and --val-tar.
Their files are hard-linked into OUT (no extra space on the same volume; copied across volumes), and
only the ones that need fixing are rewritten; the Kaggle folders are left unchanged.

Resuming: each train class is unpacked into OUT/{STATE_DIR}/partial/ and moved into place only when
complete; a marker in OUT/{STATE_DIR}/done/ is written after the move. Rerun the same command after an
interruption: finished classes are skipped and unfinished ones are redone from scratch.

Fixed files: images that are not JPEG (one PNG in train) or are CMYK JPEGs (22 in train) are rewritten
as RGB JPEGs (quality 95), so every decoder (PIL, torchvision.io, DALI) reads them. Grayscale JPEGs are
left as they are. The list is printed and saved in OUT/{REPORT_NAME}.

Checks: after preparing, the script counts what is in OUT and compares with ImageNet-1K
({IMAGENET_CLASSES} classes, {IMAGENET_COUNTS['train']:,} train and {IMAGENET_COUNTS['val']:,} val
images). A difference is reported and makes the exit status 1, because training on an incomplete copy
wastes days. Pass --allow-count-mismatch for subsets or test archives: differences are then reported
as warnings only. Files that do not match what was unpacked are always an error.

--resize N writes a second copy whose shorter side is at most N pixels (aspect ratio kept, smaller
images copied unchanged) to --resized-out (default: OUT_<N>, next to OUT; the originals are kept).
The shorter side is what RandomResizedCrop and resize-256/center-crop-224 work from, so N >= 256
keeps the standard recipe valid. Trade-off: a copy at N=256 is roughly 25-30 GB instead of about
145 GB (estimates), so it fits in the page cache and decoding is several times cheaper, but
RandomResizedCrop then samples from fewer pixels; expect a small top-1 drop (a few tenths of a
percent is commonly reported at 256; larger below that). Use it when data loading is the bottleneck.
"""


class PrepareError(Exception):
    """A problem with the inputs or the output folder that the user has to fix."""


# ---------------------------------------------------------------------------------------- devkit / labels
def read_devkit(devkit: Path) -> tuple[list[str], list[str]]:
    """Return (the 1000 leaf wnids, the wnid of every val image in file order).

    torchvision's parse_devkit_archive does the same but insists on the MD5 of the official archive and
    keeps its meta.mat / ground-truth parsers as private closures, so a few lines are repeated here.
    """
    import scipy.io

    try:
        tar = tarfile.open(devkit)
    except (tarfile.ReadError, OSError) as e:
        raise PrepareError(f"--devkit {devkit} is not a readable tar.gz archive ({e}).") from e
    with tar:
        names = {m.name.lstrip("./"): m for m in tar.getmembers() if m.isfile()}
        meta = _find_member(names, "data/meta.mat")
        truth = _find_member(names, "data/ILSVRC2012_validation_ground_truth.txt")
        if meta is None or truth is None:
            raise PrepareError(
                f"--devkit {devkit} does not look like ILSVRC2012_devkit_t12.tar.gz: it has no "
                "ILSVRC2012_devkit_t12/data/meta.mat and data/ILSVRC2012_validation_ground_truth.txt."
            )
        synsets = scipy.io.loadmat(io.BytesIO(tar.extractfile(meta).read()), squeeze_me=True)["synsets"]
        truth_lines = tar.extractfile(truth).read().decode().split()
    # meta.mat lists the whole WordNet hierarchy; the 1000 classes are its leaves (num_children == 0).
    id_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
    try:
        val_wnids = [id_to_wnid[int(x)] for x in truth_lines]
    except (KeyError, ValueError) as e:
        raise PrepareError(f"The devkit ground truth refers to an unknown class id {e}.") from e
    return sorted(id_to_wnid.values()), val_wnids


def _find_member(names: dict, suffix: str):
    hits = [m for name, m in names.items() if name.endswith(suffix)]
    return hits[0] if len(hits) == 1 else None


def read_val_csv(path: Path) -> dict[str, str]:
    """Kaggle's LOC_val_solution.csv: ImageId -> wnid (first token of PredictionString)."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise PrepareError(f"Cannot read --val-labels-csv {path}: {e.strerror}.") from e
    if not rows or not {"ImageId", "PredictionString"} <= set(rows[0]):
        raise PrepareError(
            f"--val-labels-csv {path} is not Kaggle's LOC_val_solution.csv: it needs the columns "
            "ImageId,PredictionString."
        )
    labels = {}
    for row in rows:
        wnid = row["PredictionString"].split()[0] if row["PredictionString"].strip() else ""
        if not WNID_RE.match(wnid):
            raise PrepareError(f"{path}: row {row['ImageId']} does not start with a wnid: {wnid!r}.")
        labels[row["ImageId"]] = wnid
    return labels


# ----------------------------------------------------------------------------------------------- images
def write_image(data: bytes, dest: Path) -> str | None:
    """Write one image; return a description if it had to be converted, else None.

    The format is detected from the content (PIL reads only the header here), not from the name: the
    ImageNet PNG is called .JPEG.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            kind = f"{im.format} {im.mode}"
            needs_fix = im.format != "JPEG" or im.mode not in ("RGB", "L")
            if needs_fix:
                im = im.convert("RGB")
                buf = io.BytesIO()
                im.save(buf, "JPEG", quality=95)
                data = buf.getvalue()
    except OSError as e:
        raise PrepareError(f"{dest.name} is not a readable image ({e}).") from e
    dest.write_bytes(data)
    return kind if needs_fix else None


def place_file(src: Path, dest: Path) -> str | None:
    """An image from an unpacked folder (Kaggle's layout): hard-linked when decoders read it as it is (no
    extra disk space on the same volume, a copy across volumes), rewritten when it needs fixing. The source
    file is never modified. Returns what write_image returns."""
    try:
        with Image.open(src) as im:
            needs_fix = im.format != "JPEG" or im.mode not in ("RGB", "L")
    except OSError as e:
        raise PrepareError(f"{src} is not a readable image ({e}).") from e
    if needs_fix:
        return write_image(src.read_bytes(), dest)
    try:
        os.link(src, dest)
    except OSError:  # another filesystem, or one without hard links
        shutil.copyfile(src, dest)
    return None


# ------------------------------------------------------------------------------------------------- train
def list_train_classes(train_tar: Path) -> list[tuple[str, int, int]]:
    """(wnid, data offset, size) of every inner class tar; workers read them by offset. For an unpacked
    folder (Kaggle's ILSVRC/Data/CLS-LOC/train): (wnid, 0, bytes in the class folder)."""
    if train_tar.is_dir():
        classes = sorted((d.name, 0, sum(f.stat().st_size for f in os.scandir(d) if f.is_file()))
                         for d in os.scandir(train_tar) if d.is_dir() and WNID_RE.match(d.name))
        if not classes:
            raise PrepareError(f"--train-tar {train_tar} is a folder without <wnid>/ class folders (n01440764 "
                               "...); give ILSVRC2012_img_train.tar or Kaggle's ILSVRC/Data/CLS-LOC/train.")
        return classes
    try:
        with tarfile.open(train_tar) as tar:
            members = tar.getmembers()
    except (tarfile.ReadError, OSError) as e:
        raise PrepareError(f"--train-tar {train_tar} is not a readable tar archive ({e}).") from e
    classes, other = [], []
    for m in members:
        stem = Path(m.name).name.removesuffix(".tar")
        if m.isfile() and m.name.endswith(".tar") and WNID_RE.match(stem):
            classes.append((stem, m.offset_data, m.size))
        else:
            other.append(m.name)
    if not classes:
        raise PrepareError(
            f"--train-tar {train_tar} does not look like ILSVRC2012_img_train.tar: it should hold one "
            f"<wnid>.tar per class, but holds e.g. {other[:3]}."
        )
    return sorted(classes)


def extract_train_class(train_tar: str, wnid: str, offset: int, size: int, out: str) -> dict:
    """Unpack one class tar into a partial folder, then move it into place. Runs in a worker."""
    out_dir = Path(out)
    partial = out_dir / STATE_DIR / "partial" / "train" / wnid
    final = out_dir / "train" / wnid
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    fixed, count = [], 0
    if Path(train_tar).is_dir():
        for src in sorted(Path(train_tar, wnid).iterdir()):
            if src.is_file():
                kind = place_file(src, partial / src.name)
                count += 1
                if kind:
                    fixed.append({"file": f"train/{wnid}/{src.name}", "was": kind})
    else:
        fixed, count = unpack_class_tar(train_tar, wnid, offset, size, partial)
    # A folder without a done marker may be left from a crash after the move: it is redone.
    shutil.rmtree(final, ignore_errors=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(partial, final)
    result = {"count": count, "fixed": fixed}
    write_marker(out_dir, "train", wnid, result)
    return result


def unpack_class_tar(train_tar: str, wnid: str, offset: int, size: int, partial: Path) -> tuple[list[dict], int]:
    fixed, count = [], 0
    with open(train_tar, "rb") as raw:
        info = tarfile.TarInfo(f"{wnid}.tar")
        info.offset_data, info.size = offset, size
        with tarfile.open(train_tar, fileobj=raw) as outer:
            inner_file = outer.extractfile(info)
            try:
                inner = tarfile.open(fileobj=inner_file)
            except tarfile.ReadError as e:
                raise PrepareError(f"{wnid}.tar inside {train_tar} is not a readable tar ({e}).") from e
            with inner:
                for m in inner:
                    if not m.isfile():
                        continue
                    name = Path(m.name).name  # never trust paths inside an archive
                    kind = write_image(inner.extractfile(m).read(), partial / name)
                    count += 1
                    if kind:
                        fixed.append({"file": f"train/{wnid}/{name}", "was": kind})
    return fixed, count


# --------------------------------------------------------------------------------------------------- val
def extract_val(val_tar: Path, out: Path, label_of) -> dict:
    """Unpack the flat val tar into val/<wnid>/. Files are written under a temporary name and renamed,
    so after an interruption the ones already present are complete and are skipped."""
    partial = out / STATE_DIR / "partial" / "val"
    if val_tar.is_dir():  # Kaggle's ILSVRC/Data/CLS-LOC/val: the same flat files, already unpacked
        tar, members = contextlib.nullcontext(), sorted(p for p in val_tar.iterdir() if p.is_file())
    else:
        try:
            tar = tarfile.open(val_tar)
            members = [m for m in tar.getmembers() if m.isfile()]
        except (tarfile.ReadError, OSError) as e:
            raise PrepareError(f"--val-tar {val_tar} is not a readable tar archive ({e}).") from e
    with tar:
        images = [(m, VAL_NAME_RE.match(Path(m.name).name)) for m in members]
        images = [(m, match) for m, match in images if match]
        if not images:
            raise PrepareError(
                f"--val-tar {val_tar} does not look like ILSVRC2012_img_val.tar: it holds no files named "
                "ILSVRC2012_val_<8 digits>.JPEG."
            )
        # Conversions are logged as they happen: a converted file is an RGB JPEG afterwards, so an
        # interrupted run's fix-ups could not be found again by looking at the files.
        fixed_log = partial / ".fixed.jsonl"
        for m, match in tqdm(images, desc="val", unit="img"):
            wnid = label_of(match.group(1), int(match.group(2)))
            dest = partial / wnid / Path(m.name).name
            if dest.exists():
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(dest.name + ".tmp")
            kind = place_file(m, tmp) if val_tar.is_dir() else write_image(tar.extractfile(m).read(), tmp)
            if kind:
                with open(fixed_log, "a") as f:
                    f.write(json.dumps({"file": f"val/{wnid}/{dest.name}", "was": kind}) + "\n")
            os.replace(tmp, dest)
    fixed = [json.loads(line) for line in fixed_log.read_text().splitlines()] if fixed_log.exists() else []
    fixed = list({f["file"]: f for f in fixed}.values())
    fixed_log.unlink(missing_ok=True)
    shutil.rmtree(out / "val", ignore_errors=True)
    os.replace(partial, out / "val")
    result = {"count": len(images), "fixed": fixed}
    write_marker(out, "val", "all", result)
    return result


# ---------------------------------------------------------------------------------------------- markers
def marker_path(out: Path, split: str, name: str) -> Path:
    return out / STATE_DIR / "done" / split / f"{name}.json"


def write_marker(out: Path, split: str, name: str, result: dict) -> None:
    path = marker_path(out, split, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, path)


def read_marker(out: Path, split: str, name: str) -> dict | None:
    path = marker_path(out, split, name)
    return json.loads(path.read_text()) if path.exists() else None


# ------------------------------------------------------------------------------------------------ checks
def count_images(split_dir: Path) -> dict[str, int]:
    counts = {}
    for entry in sorted(os.scandir(split_dir), key=lambda e: e.name):
        if entry.is_dir():
            counts[entry.name] = sum(1 for f in os.scandir(entry.path) if f.name.endswith(".JPEG"))
    return counts


def verify(out: Path, splits: list[str], expected_wnids: list[str] | None) -> tuple[list[str], list[str]]:
    """Return (errors, differences from ImageNet-1K). Errors mean the folder is not what was unpacked."""
    errors, diffs = [], []
    for split in splits:
        counts = count_images(out / split)
        if split == "train":
            unpacked = {w: (read_marker(out, "train", w) or {}).get("count") for w in counts}
        else:
            val_marker = read_marker(out, "val", "all") or {}
            unpacked = {"all": val_marker.get("count")}
            counts_cmp = {"all": sum(counts.values())}
        wrong = [f"{w}: {n} files, {unpacked[w] if unpacked[w] is not None else 'unfinished'} unpacked"
                 for w, n in (counts if split == "train" else counts_cmp).items() if n != unpacked[w]]
        if wrong:
            more = f" and {len(wrong) - 5} more" if len(wrong) > 5 else ""
            errors.append(f"{split} does not match what was unpacked ({'; '.join(wrong[:5])}{more}); "
                          "rerun the same command to redo those classes")
        n_img, n_cls = sum(counts.values()), len(counts)
        if n_cls != IMAGENET_CLASSES or n_img != IMAGENET_COUNTS[split]:
            diffs.append(f"{split} has {n_cls} classes and {n_img:,} images; ImageNet-1K has "
                         f"{IMAGENET_CLASSES} and {IMAGENET_COUNTS[split]:,}")
        if expected_wnids is not None:
            missing = sorted(set(expected_wnids) - set(counts))
            extra = sorted(set(counts) - set(expected_wnids))
            if extra:
                errors.append(f"{split} has classes that are not in the devkit: {', '.join(extra[:5])}")
            if missing:
                diffs.append(f"{split} lacks {len(missing)} devkit classes, e.g. {', '.join(missing[:5])}")
    if {"train", "val"} <= set(splits):
        only_val = set(count_images(out / "val")) - set(count_images(out / "train"))
        if only_val:
            errors.append(f"val has classes that train lacks: {', '.join(sorted(only_val)[:5])}")
    return errors, diffs


# ------------------------------------------------------------------------------------------------ resize
def resize_class(src: str, dst_root: str, rel: str, size: int) -> int:
    """Write a copy of one class folder with the shorter side at most `size`. Runs in a worker."""
    dst_root_p = Path(dst_root)
    partial = dst_root_p / STATE_DIR / "partial" / rel
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    n = 0
    for entry in sorted(os.scandir(src), key=lambda e: e.name):
        if not entry.name.endswith(".JPEG"):
            continue
        with Image.open(entry.path) as im:
            if min(im.size) <= size:
                shutil.copyfile(entry.path, partial / entry.name)  # never upscale or recompress
            else:
                # draft() lets libjpeg decode at 1/2, 1/4 or 1/8 scale while staying >= size: much faster.
                im.draft(im.mode, (size, size))
                w, h = im.size
                scale = size / min(w, h)
                new = (max(size, round(w * scale)), max(size, round(h * scale)))
                small = im.resize(new, Image.BICUBIC)
                small.save(partial / entry.name, "JPEG", quality=95)
        n += 1
    final = dst_root_p / rel
    shutil.rmtree(final, ignore_errors=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(partial, final)
    split, wnid = rel.split("/")
    write_marker(dst_root_p, f"resize-{split}", wnid, {"count": n})
    return n


def resize_copy(out: Path, dst: Path, size: int, splits: list[str], workers: int) -> None:
    jobs = [f"{split}/{wnid}" for split in splits for wnid in sorted(os.listdir(out / split))
            if not read_marker(dst, f"resize-{split}", wnid)]
    if not jobs:
        print(f"resized copy in {dst} is complete")
        return
    with ProcessPoolExecutor(workers) as pool:
        futures = [pool.submit(resize_class, str(out / rel), str(dst), rel, size) for rel in jobs]
        for fut in tqdm(as_completed(futures), total=len(futures), desc=f"resize {size}", unit="class"):
            fut.result()


# -------------------------------------------------------------------------------------------------- main
def check_file(path: Path | None, flag: str, folder_ok: bool = False) -> None:
    if path is not None and not (path.is_file() or folder_ok and path.is_dir()):
        raise PrepareError(f"{flag} {path}: no such file. Check the path (download it first, see "
                           "ImageNet_Setup_Guide.md).")


def check_space(out: Path, needed: int) -> None:
    free = shutil.disk_usage(out).free
    if needed > free:
        raise PrepareError(f"Not enough free space in {out}: about {needed / 1e9:.1f} GB is needed and "
                           f"{free / 1e9:.1f} GB is free. Use a bigger volume or free some space.")


def prepare_train(args, out: Path) -> list[dict]:
    classes = list_train_classes(args.train_tar)
    todo = [c for c in classes if not (read_marker(out, "train", c[0]) and (out / "train" / c[0]).is_dir())]
    print(f"train: {len(classes)} class archives, {len(classes) - len(todo)} already done")
    same_volume = args.train_tar.is_dir() and args.train_tar.stat().st_dev == out.stat().st_dev
    check_space(out, 0 if same_volume else sum(size for _, _, size in todo))  # hard links take no space
    if todo:
        with ProcessPoolExecutor(args.workers) as pool:
            futures = [pool.submit(extract_train_class, str(args.train_tar), w, off, size, str(out))
                       for w, off, size in todo]
            for fut in tqdm(as_completed(futures), total=len(futures), desc="train", unit="class"):
                fut.result()
    return [f for wnid, _, _ in classes for f in read_marker(out, "train", wnid)["fixed"]]


def prepare_val(args, out: Path) -> list[dict]:
    done = read_marker(out, "val", "all")
    if done and (out / "val").is_dir():
        print("val: already done")
        return done["fixed"]
    if args.val_labels_csv:
        csv_labels = read_val_csv(args.val_labels_csv)

        def label_of(image_id: str, number: int) -> str:
            if image_id not in csv_labels:
                raise PrepareError(f"{args.val_labels_csv} has no label for {image_id}.")
            return csv_labels[image_id]
    else:
        val_wnids = read_devkit(args.devkit)[1]

        def label_of(image_id: str, number: int) -> str:
            if not 1 <= number <= len(val_wnids):
                raise PrepareError(f"The devkit ground truth has no line for {image_id}.")
            return val_wnids[number - 1]
    if args.val_tar.is_file():
        check_space(out, args.val_tar.stat().st_size)
    return extract_val(args.val_tar, out, label_of)["fixed"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=HELP_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-tar", type=Path, help="ILSVRC2012_img_train.tar, or an unpacked folder of <wnid>/ folders "
                                                  "such as Kaggle's ILSVRC/Data/CLS-LOC/train (omit to skip train)")
    p.add_argument("--val-tar", type=Path, help="ILSVRC2012_img_val.tar, or an unpacked folder of its flat files "
                                                "such as Kaggle's ILSVRC/Data/CLS-LOC/val (omit to skip val)")
    labels = p.add_mutually_exclusive_group()
    labels.add_argument("--devkit", type=Path, help="ILSVRC2012_devkit_t12.tar.gz: val labels (needs scipy)")
    labels.add_argument("--val-labels-csv", type=Path, help="Kaggle LOC_val_solution.csv, not --devkit")
    p.add_argument("--out", type=Path, required=True, help="output folder; gets train/ and val/")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all CPUs)")
    p.add_argument("--resize", type=int, metavar="N", help="also write a copy, shorter side at most N pixels")
    p.add_argument("--resized-out", type=Path, help="where the --resize copy goes (default: OUT_<N>)")
    p.add_argument("--allow-count-mismatch", action="store_true",
                   help="report differences from ImageNet-1K's counts as warnings, not errors")
    args = p.parse_args(argv)
    if not args.train_tar and not args.val_tar:
        p.error("give --train-tar, --val-tar or both")
    if args.val_tar and not (args.devkit or args.val_labels_csv):
        p.error("--val-tar needs labels: give --devkit or --val-labels-csv")
    if args.workers < 1 or (args.resize is not None and args.resize < 1):
        p.error("--workers and --resize must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.time()
    check_file(args.train_tar, "--train-tar", folder_ok=True)
    check_file(args.val_tar, "--val-tar", folder_ok=True)
    check_file(args.devkit, "--devkit")
    check_file(args.val_labels_csv, "--val-labels-csv")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    # The devkit is read first so that a bad devkit fails in seconds, not after hours of train extraction.
    devkit_wnids = read_devkit(args.devkit)[0] if args.devkit else None

    fixed = []
    if args.train_tar:
        fixed += prepare_train(args, out)
    if args.val_tar:
        fixed += prepare_val(args, out)
    splits = [s for s in ("train", "val") if (out / s).is_dir()]
    errors, diffs = verify(out, splits, devkit_wnids)
    counts = {s: sum(count_images(out / s).values()) for s in splits}
    report = {"counts": counts, "fixed": fixed, "errors": errors, "differences_from_imagenet": diffs}
    (out / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")

    if fixed:
        print(f"rewrote {len(fixed)} file(s) as RGB JPEG:")
        for f in fixed:
            print(f"  {f['file']} (was {f['was']})")
    print("images: " + ", ".join(f"{s} {n:,}" for s, n in counts.items()) + f"; report: {out / REPORT_NAME}")
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    for d in diffs:
        level = "warning" if args.allow_count_mismatch else "error"
        print(f"{level}: counts differ from ImageNet-1K: {d}", file=sys.stderr)
    if errors or (diffs and not args.allow_count_mismatch):
        if diffs and not args.allow_count_mismatch:
            print("The data is in place; pass --allow-count-mismatch if a subset is intended.",
                  file=sys.stderr)
        return 1

    if args.resize:
        dst = (args.resized_out or out.with_name(f"{out.name}_{args.resize}")).resolve()
        dst.mkdir(parents=True, exist_ok=True)
        resize_copy(out, dst, args.resize, splits, args.workers)
        print(f"resized copy (shorter side <= {args.resize}): {dst}")
    print(f"done in {time.time() - start:.0f} s; train.py --data-dir {out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to continue where it stopped", file=sys.stderr)
        sys.exit(130)
