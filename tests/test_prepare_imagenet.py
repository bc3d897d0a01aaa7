"""prepare_imagenet.py on tiny archives that have exactly the layout of the real ILSVRC2012 files."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

scipy_io = pytest.importorskip("scipy.io")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "prepare_imagenet.py"

# ILSVRC2012_IDs deliberately not in sorted-wnid order, like the real meta.mat.
ID_TO_WNID = {1: "n02105855", 2: "n01440764", 3: "n01443537"}
TRAIN_PER_CLASS = 4
# Val image number -> ILSVRC2012_ID.
VAL_IDS = [2, 1, 3, 3, 1, 2, 1]
PNG_NAME = "n02105855_2933.JPEG"
CMYK_TRAIN = "n01440764_3.JPEG"
CMYK_VAL = "ILSVRC2012_val_00000005.JPEG"
GRAY_TRAIN = "n01443537_2.JPEG"
BIG_TRAIN = "n01443537_1.JPEG"  # 64x48, the only image larger than the --resize size used below


def image_bytes(mode="RGB", size=(20, 20), fmt="JPEG", seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "CMYK": 4, "L": 1}[mode]
    pixels = rng.integers(0, 255, (size[1], size[0], channels), dtype=np.uint8)
    im = Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def train_image(name: str, seed: int) -> bytes:
    if name == PNG_NAME:
        return image_bytes(fmt="PNG", seed=seed)
    if name == CMYK_TRAIN:
        return image_bytes("CMYK", seed=seed)
    if name == GRAY_TRAIN:
        return image_bytes("L", seed=seed)
    if name == BIG_TRAIN:
        return image_bytes(size=(64, 48), seed=seed)
    return image_bytes(seed=seed)


def make_archives(d: Path) -> dict[str, Path]:
    d.mkdir(parents=True, exist_ok=True)
    train = d / "ILSVRC2012_img_train.tar"
    with tarfile.open(train, "w") as outer:
        for wnid in sorted(ID_TO_WNID.values()):
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as inner:
                names = [f"{wnid}_{i}.JPEG" for i in range(1, TRAIN_PER_CLASS + 1)]
                if wnid == "n02105855":
                    names[0] = PNG_NAME
                for i, name in enumerate(names):
                    add_bytes(inner, name, train_image(name, i))
            add_bytes(outer, f"{wnid}.tar", buf.getvalue())

    val = d / "ILSVRC2012_img_val.tar"
    with tarfile.open(val, "w") as tar:
        for i in range(1, len(VAL_IDS) + 1):
            name = f"ILSVRC2012_val_{i:08d}.JPEG"
            add_bytes(tar, name, image_bytes("CMYK" if name == CMYK_VAL else "RGB", seed=100 + i))

    # meta.mat: the synsets struct array as in the real devkit, including a non-leaf node.
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    synsets = np.zeros((len(ID_TO_WNID) + 1, 1), dtype=[(f, object) for f in fields])
    for row, (idx, wnid) in enumerate(sorted(ID_TO_WNID.items())):
        synsets[row, 0] = (idx, wnid, f"word {wnid}, other", "gloss", 0, np.zeros((1, 0)), 0, TRAIN_PER_CLASS)
    synsets[-1, 0] = (1001, "n00001740", "entity", "gloss", 3, np.array([[1, 2, 3]]), 5, 0)
    mat = io.BytesIO()
    scipy_io.savemat(mat, {"synsets": synsets})
    devkit = d / "ILSVRC2012_devkit_t12.tar.gz"
    with tarfile.open(devkit, "w:gz") as tar:
        add_bytes(tar, "ILSVRC2012_devkit_t12/data/meta.mat", mat.getvalue())
        truth = "".join(f"{i}\n" for i in VAL_IDS).encode()
        add_bytes(tar, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", truth)

    csv = d / "LOC_val_solution.csv"
    lines = ["ImageId,PredictionString"] + [
        f"ILSVRC2012_val_{i:08d},{ID_TO_WNID[idx]} 1 2 10 12 {ID_TO_WNID[idx]} 3 4 9 9 "
        for i, idx in enumerate(VAL_IDS, start=1)
    ]
    csv.write_text("\n".join(lines) + "\n")
    return {"train": train, "val": val, "devkit": devkit, "csv": csv}


def run(*args, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def prepare(archives, out, *extra, labels="devkit", check=True):
    label_flag = ["--devkit", archives["devkit"]]
    if labels == "csv":
        label_flag = ["--val-labels-csv", archives["csv"]]
    return run("--train-tar", archives["train"], "--val-tar", archives["val"], *label_flag, "--out", out,
               "--workers", 2, "--allow-count-mismatch", *extra, check=check)


def expected_val() -> dict[str, set[str]]:
    layout: dict[str, set[str]] = {}
    for i, idx in enumerate(VAL_IDS, start=1):
        layout.setdefault(ID_TO_WNID[idx], set()).add(f"ILSVRC2012_val_{i:08d}.JPEG")
    return layout


def tree(root: Path) -> dict[str, set[str]]:
    return {d.name: {f.name for f in d.iterdir()} for d in sorted(root.iterdir())}


def snapshot(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*.JPEG")}


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    return make_archives(tmp_path_factory.mktemp("archives"))


@pytest.fixture(scope="module")
def prepared(archives, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "extracted"
    proc = prepare(archives, out, "--resize", 32)
    return out, proc


def test_layout_and_devkit_labels(prepared):
    out, proc = prepared
    train = tree(out / "train")
    assert sorted(train) == sorted(ID_TO_WNID.values())
    assert all(len(files) == TRAIN_PER_CLASS for files in train.values())
    assert PNG_NAME in train["n02105855"]
    assert tree(out / "val") == expected_val()
    # Nothing but class folders next to the classes: ImageFolder would take anything else for a class.
    assert not list((out / "train").glob(".*")) and not list((out / "val").glob(".*"))
    assert "differ from ImageNet-1K" in proc.stderr and "warning" in proc.stderr


def test_csv_labels_match_devkit(archives, tmp_path):
    out = tmp_path / "csv"
    run("--val-tar", archives["val"], "--val-labels-csv", archives["csv"], "--out", out,
        "--allow-count-mismatch")
    assert tree(out / "val") == expected_val()
    assert not (out / "train").exists()


def test_fixed_files_are_rgb_jpegs_and_reported(prepared):
    out, proc = prepared
    report = json.loads((out / "prepare_report.json").read_text())
    fixed = {f["file"]: f["was"] for f in report["fixed"]}
    val_cmyk = next(f"val/{w}/{CMYK_VAL}" for w, names in expected_val().items() if CMYK_VAL in names)
    assert fixed == {
        f"train/n02105855/{PNG_NAME}": "PNG RGB",
        f"train/n01440764/{CMYK_TRAIN}": "JPEG CMYK",
        val_cmyk: "JPEG CMYK",
    }
    for rel in fixed:
        with Image.open(out / rel) as im:
            assert (im.format, im.mode) == ("JPEG", "RGB")
        assert rel in proc.stdout
    with Image.open(out / "train" / "n01443537" / GRAY_TRAIN) as im:
        assert im.mode == "L"  # grayscale decodes fine everywhere and is left alone
    assert report["counts"] == {"train": 3 * TRAIN_PER_CLASS, "val": len(VAL_IDS)}


def test_resize_copy(prepared):
    out, _ = prepared
    resized = out.with_name("extracted_32")
    assert tree(resized / "train") == tree(out / "train")
    assert tree(resized / "val") == tree(out / "val")
    with Image.open(resized / "train" / "n01443537" / BIG_TRAIN) as im:
        assert im.size == (43, 32)
    small = out / "train" / "n01440764" / "n01440764_1.JPEG"
    assert (resized / small.relative_to(out)).read_bytes() == small.read_bytes()  # not upscaled
    with Image.open(out / "train" / "n01443537" / BIG_TRAIN) as im:
        assert im.size == (64, 48)  # originals kept


def test_rerun_is_quick_and_changes_nothing(archives, prepared, tmp_path):
    src, _ = prepared
    out = tmp_path / "extracted"
    shutil.copytree(src, out)
    before = snapshot(out)
    start = time.time()
    proc = prepare(archives, out)
    assert time.time() - start < 20
    assert snapshot(out) == before
    assert "3 already done" in proc.stdout and "val: already done" in proc.stdout
    report = json.loads((out / "prepare_report.json").read_text())
    assert len(report["fixed"]) == 3  # fix-ups stay listed after a rerun that skipped everything


def test_interrupted_run_is_completed(archives, prepared, tmp_path):
    src, _ = prepared
    out = tmp_path / "extracted"
    shutil.copytree(src, out)
    # As left by a kill: one class moved into place but not marked done, with a file missing;
    # another still half-written in the partial folder; val half-done.
    (out / ".prepare_state/done/train/n01440764.json").unlink()
    (out / "train/n01440764/n01440764_2.JPEG").unlink()
    (out / ".prepare_state/done/train/n02105855.json").unlink()
    shutil.rmtree(out / "train/n02105855")
    partial = out / ".prepare_state/partial/train/n02105855"
    partial.mkdir(parents=True)
    (partial / "n02105855_2.JPEG").write_bytes(b"\xff\xd8truncated")
    (out / ".prepare_state/done/val/all.json").unlink()
    shutil.move(out / "val", out / ".prepare_state/partial/val")
    untouched = {k: v for k, v in snapshot(out).items() if k.startswith("train/n01443537")}

    proc = prepare(archives, out)
    assert "1 already done" in proc.stdout
    assert all(len(files) == TRAIN_PER_CLASS for files in tree(out / "train").values())
    assert tree(out / "val") == expected_val()
    assert {k: v for k, v in snapshot(out).items() if k.startswith("train/n01443537")} == untouched
    with Image.open(out / "train/n02105855/n02105855_2.JPEG") as im:
        im.load()
    assert not [p for p in (out / ".prepare_state/partial").rglob("*") if p.is_file()]


def test_count_mismatch_is_an_error_without_flag(archives, prepared, tmp_path):
    src, _ = prepared
    out = tmp_path / "extracted"
    shutil.copytree(src, out)
    proc = run("--train-tar", archives["train"], "--out", out, check=False)
    assert proc.returncode == 1
    assert "ImageNet-1K has 1000 and 1,281,167" in proc.stderr and "--allow-count-mismatch" in proc.stderr


def test_files_removed_after_prepare_are_reported(archives, prepared, tmp_path):
    src, _ = prepared
    out = tmp_path / "extracted"
    shutil.copytree(src, out)
    (out / "train/n01440764/n01440764_1.JPEG").unlink()
    proc = run("--train-tar", archives["train"], "--out", out, "--allow-count-mismatch", check=False)
    assert proc.returncode == 1
    assert "n01440764: 3 files, 4 unpacked" in proc.stderr


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing_tar", "no such file"),
        ("not_a_tar", "not a readable tar"),
        ("wrong_archive", "does not look like ILSVRC2012_img_train.tar"),
        ("missing_devkit", "--devkit"),
        ("wrong_devkit", "does not look like ILSVRC2012_devkit_t12.tar.gz"),
        ("no_labels", "--val-tar needs labels"),
    ],
)
def test_bad_input_gives_one_clear_error(archives, tmp_path, case, expected):
    out = tmp_path / "out"
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"this is not an archive" * 100)
    wrong = tmp_path / "wrong.tar"
    with tarfile.open(wrong, "w") as tar:
        add_bytes(tar, "readme.txt", b"hello")
    args = {
        "missing_tar": ["--train-tar", tmp_path / "nope.tar"],
        "not_a_tar": ["--train-tar", junk],
        "wrong_archive": ["--train-tar", wrong],
        "missing_devkit": ["--val-tar", archives["val"], "--devkit", tmp_path / "nope.tar.gz"],
        "wrong_devkit": ["--val-tar", archives["val"], "--devkit", wrong],
        "no_labels": ["--val-tar", archives["val"]],
    }[case]
    proc = run(*args, "--out", out, check=False)
    assert proc.returncode != 0
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr


def test_kaggle_unpacked_folders_give_the_same_result_without_copying(archives, tmp_path):
    """Kaggle ships ILSVRC/Data/CLS-LOC/{train/<wnid>/,val/} already unpacked; they are accepted as they are."""
    kaggle = tmp_path / "ILSVRC" / "Data" / "CLS-LOC"
    with tarfile.open(archives["train"]) as outer:
        for member in outer.getmembers():
            with tarfile.open(fileobj=outer.extractfile(member)) as inner:
                inner.extractall(kaggle / "train" / member.name.removesuffix(".tar"), filter="data")
    with tarfile.open(archives["val"]) as tar:
        tar.extractall(kaggle / "val", filter="data")
    source_bytes = {p: p.read_bytes() for p in kaggle.rglob("*.JPEG")}

    out = tmp_path / "out"
    run("--train-tar", kaggle / "train", "--val-tar", kaggle / "val", "--val-labels-csv", archives["csv"],
        "--out", out, "--workers", 2, "--allow-count-mismatch")
    reference = tmp_path / "from_tars"
    prepare(archives, reference, labels="csv")
    assert tree(out / "train") == tree(reference / "train") and tree(out / "val") == expected_val()
    report = json.loads((out / "prepare_report.json").read_text())
    assert {f["file"] for f in report["fixed"]} == {f"train/n02105855/{PNG_NAME}", f"train/n01440764/{CMYK_TRAIN}",
                                                    f"val/{ID_TO_WNID[VAL_IDS[4]]}/{CMYK_VAL}"}
    with Image.open(out / "train" / "n02105855" / PNG_NAME) as im:
        assert (im.format, im.mode) == ("JPEG", "RGB")
    good = out / "train" / "n01440764" / "n01440764_1.JPEG"
    assert good.stat().st_ino == (kaggle / "train" / "n01440764" / "n01440764_1.JPEG").stat().st_ino  # a hard link
    assert all(p.read_bytes() == data for p, data in source_bytes.items())  # the Kaggle copy is untouched
