import os
import shutil

import numpy as np
import pytest
import torch
from conftest import add_odd_images
from PIL import Image
from sklearn.datasets import load_sample_image
from torchvision.transforms import functional as F

import data
from data import (
    BAD_IMAGE_ERRORS,
    ImageFolderDataset,
    TrainBatchSampler,
    ValBatchSampler,
    center_crop_box,
    collate,
    decode_crop,
    decode_region,
    decode_region_pil,
    make_loader,
    random_resized_crop_box,
    sample_rng,
)
from dataset_paths import DatasetLayoutError, check_layout


def epoch_batches(num_samples, batch, world, seed, epoch, start=0):
    """{rank: [batch, ...]} for one epoch."""
    out = {}
    for rank in range(world):
        sampler = TrainBatchSampler(num_samples, batch, rank, world, seed)
        sampler.set_epoch(epoch, start)
        out[rank] = list(sampler)
    return out


def test_ranks_share_an_epoch_without_overlap_and_reshuffle_each_epoch():
    per_rank = epoch_batches(103, 5, 3, seed=1, epoch=0)
    indices = [i for batches in per_rank.values() for b in batches for _, i in b]
    assert len(indices) == len(set(indices)) == (103 // 15) * 15
    assert all(len(b) == 5 for batches in per_rank.values() for b in batches)
    again = epoch_batches(103, 5, 3, seed=1, epoch=0)
    assert again == per_rank
    next_epoch = epoch_batches(103, 5, 3, seed=1, epoch=1)
    assert [i for _, i in next_epoch[0][0]] != [i for _, i in per_rank[0][0]]


def test_resuming_mid_epoch_yields_exactly_the_remaining_batches():
    full = epoch_batches(100, 4, 2, seed=3, epoch=2)
    resumed = epoch_batches(100, 4, 2, seed=3, epoch=2, start=5 * 8)  # 5 steps of a global batch of 8 done
    assert all(resumed[r] == full[r][5:] for r in range(2))


def test_a_new_world_size_continues_from_the_same_image():
    done = 6 * 8  # six steps on two ranks with batch 4
    two_ranks = epoch_batches(100, 4, 2, seed=0, epoch=0)
    seen = {i for r in range(2) for b in two_ranks[r][:6] for _, i in b}
    one_rank = epoch_batches(100, 4, 1, seed=0, epoch=0, start=done)
    rest = [i for b in one_rank[0] for _, i in b]
    assert not seen & set(rest)
    assert len(seen) + len(rest) == 100


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_validation_covers_every_image_exactly_once(world):
    indices = [i for rank in range(world) for b in ValBatchSampler(359, 16, rank, world) for _, i in b]
    assert sorted(indices) == list(range(359))


def test_random_resized_crop_boxes_stay_inside_and_follow_the_scale_range():
    rng = np.random.default_rng(0)
    fractions = []
    for _ in range(2000):
        left, top, w, h = random_resized_crop_box(rng, 500, 375, 0.08)
        assert 0 <= left and 0 <= top and left + w <= 500 and top + h <= 375 and w > 0 and h > 0
        fractions.append(w * h / (500 * 375))
    assert 0.07 < min(fractions) < 0.12 and max(fractions) > 0.9
    assert 0.4 < np.mean(fractions) < 0.6  # uniform in [0.08, 1] has mean 0.54; rejections shift it a little


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A real photograph, scikit-learn's 640x427 china.jpg, saved as a JPEG."""
    path = tmp_path_factory.mktemp("photo") / "china.JPEG"
    Image.fromarray(load_sample_image("china.jpg")).save(path, quality=90)
    return path


def mean_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)).mean())


def pil_resize(photo, box, size):
    """PIL's full decode and BILINEAR resize(box=...), which reads pixels around the box where torchvision's
    crop-then-resize does not: the PIL path's pixels, and torchvision's val transform for center_crop_box."""
    left, top, w, h = box
    with Image.open(photo) as img:
        return img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))


def moved(box, dx):
    left, top, w, h = box
    return (left + dx if left + dx + w <= 640 else left - dx), top, w, h


def torchvision_crop(photo, box, size):
    """torchvision's RandomResizedCrop pixels for `box`: PIL's full decode, crop, then BILINEAR resize."""
    left, top, w, h = box
    with Image.open(photo) as img:
        return F.resized_crop(img.convert("RGB"), top, left, h, w, [size, size])


@pytest.mark.parametrize("size", [64, 224])
def test_the_libjpeg_turbo_path_crops_like_torchvision(photo, size):
    """torch's uint8 antialiased resize is PIL's filter in fixed point. Measured on these 24 crops of
    china.jpg: mean difference 0.002 grey levels at 64 px and 0.005 at 224, no pixel more than 2 levels off.
    (OpenCV's INTER_AREA, used before, was 1.1 to 2.3 levels off on average.)"""
    diffs, moved_diffs = [], []
    for box in [random_resized_crop_box(sample_rng(0, 0, i), 640, 427, 0.08) for i in range(24)]:
        calls = []
        fast = decode_crop(os.fsencode(photo), lambda w, h, box=box, calls=calls: calls.append((w, h)) or box,
                           size)
        assert calls == [(640, 427)] and fast.shape == (size, size, 3) and fast.dtype == np.uint8
        reference = np.asarray(torchvision_crop(photo, box, size), dtype=np.int16)
        assert np.abs(fast - reference).max() <= 3
        diffs.append(mean_diff(fast, reference))
        if size == 224:  # no reduced-size decode applies to these crops at 224: the PIL path is PIL's resize itself
            pil = decode_region_pil(os.fsencode(photo), lambda w, h, box=box: box, size)
            assert np.array_equal(np.asarray(pil), pil_resize(photo, box, size))
        # What a wrong geometry looks like: the same box 3 pixels to the side, for the bound to mean something.
        moved_diffs.append(mean_diff(fast, torchvision_crop(photo, moved(box, 3), size)))
    assert np.mean(diffs) < 0.05 and min(moved_diffs) > 10 * max(diffs)


def test_a_panorama_of_extreme_shape_is_not_scaled_whole_for_its_val_crop(photo, tmp_path, monkeypatch):
    """Scaling a 3 x 2000 px strip so its short side is 73 px would make it 73 x 48,666 px: the val path must
    compute only the crop, and still give Resize + CenterCrop's pixels."""
    from torchvision import transforms

    with Image.open(photo) as img:
        strip = img.convert("RGB").resize((2000, 3))
    strip.save(tmp_path / "strip.JPEG", quality=95)
    val_transform = transforms.Compose([transforms.Resize(73), transforms.CenterCrop(64)])
    with Image.open(tmp_path / "strip.JPEG") as img:
        reference = np.asarray(val_transform(img.convert("RGB")))

    def refuse(*args, **kwargs):
        raise AssertionError("the whole strip was scaled")

    monkeypatch.setattr(data.F, "interpolate", refuse)
    fast = decode_crop(os.fsencode(tmp_path / "strip.JPEG"), lambda w, h: center_crop_box(w, h, 64), 64)
    assert fast.shape == (64, 64, 3) and fast.flags.writeable
    assert np.abs(fast.astype(np.int16) - reference).max() <= 1


def extraneous_bytes_jpeg(path):
    """A JPEG that libjpeg-turbo reads with a warning, which simplejpeg treats as an error, and PIL decodes."""
    data = path.read_bytes()
    return data[:-2] + b"\x00\x01" + data[-2:]


def test_files_libjpeg_turbo_refuses_get_the_pil_paths_pixels_or_error(odd_images_dir, photo, monkeypatch):
    folder = odd_images_dir / "train" / "n000"
    (folder / "odd_g_extraneous.JPEG").write_bytes(extraneous_bytes_jpeg(photo))
    pil_calls = []

    def counting_pil(path, box_fn, size):
        pil_calls.append(os.path.basename(os.fsdecode(path)))
        return decode_region_pil(path, box_fn, size)

    monkeypatch.setattr(data, "decode_region_pil", counting_pil)
    for file in [*sorted(folder.iterdir()), folder / "z_missing.JPEG"]:  # missing: a vanished volume
        path, box_fn = os.fsencode(file), lambda w, h: center_crop_box(w, h, 32)
        try:
            expected = np.asarray(decode_region_pil(path, box_fn, 32))
        except BAD_IMAGE_ERRORS as err:
            with pytest.raises(type(err)) as raised:
                decode_crop(path, box_fn, 32)
            assert str(raised.value) == str(err)  # the line the run reports for a skipped file
            continue
        if file.name in ("odd_c_gray.JPEG", "z_good.JPEG"):  # libjpeg-turbo's: compared with a full PIL decode
            with Image.open(file) as img:
                box = box_fn(*img.size)
            assert mean_diff(decode_crop(path, box_fn, 32), pil_resize(file, box, 32)) < 2.0
        else:
            assert np.array_equal(decode_crop(path, box_fn, 32), expected)
    assert pil_calls == ["odd_a_png.JPEG", "odd_b_cmyk.JPEG", "odd_d_truncated.JPEG", "odd_e_empty.JPEG",
                         "odd_f_text.JPEG", "odd_g_extraneous.JPEG"]


def test_a_sample_drawn_before_falling_back_to_pil_keeps_its_box_and_flip(photo, tmp_path):
    """The extraneous-bytes JPEG passes libjpeg-turbo's header check and fails its decode: PIL must get the
    sample's first box, not a second draw, and the flip must be the draw after it, as for any other file."""
    folder = tmp_path / "train" / "n000"
    folder.mkdir(parents=True)
    (folder / "a.JPEG").write_bytes(extraneous_bytes_jpeg(photo))
    shutil.copy(photo, folder / "b.JPEG")
    ds = ImageFolderDataset(tmp_path / "train", ["n000"], True, 96, seed=5)
    flips = set()
    for epoch in range(6):
        for index, decode in ((0, decode_region_pil), (1, decode_region)):
            rng = sample_rng(5, epoch, index)
            box = random_resized_crop_box(rng, 640, 427, ds.min_crop_scale)
            expected = decode(ds.paths[index], lambda w, h, box=box: box, 96)
            flip = rng.random() < 0.5
            if flip:
                expected = expected.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            image = ds.load(epoch, index)
            assert torch.equal(image, torch.from_numpy(np.array(expected)))
            assert torch.equal(image, ds.load(epoch, index))  # and again: a pure function of (seed, epoch, index)
            flips.add(flip)
    assert flips == {True, False}


@pytest.mark.parametrize("size", [64, 224])
def test_the_val_box_is_torchvisions_resize_and_center_crop(photo, size):
    from torchvision import transforms

    val_transform = transforms.Compose([transforms.Resize(round(size / 0.875)), transforms.CenterCrop(size)])
    with Image.open(photo) as img:
        landscape = img.convert("RGB")
    for image in (landscape, landscape.transpose(Image.Transpose.ROTATE_90)):
        left, top, w, h = center_crop_box(*image.size, size)
        assert min(w, h) / min(image.size) == pytest.approx(0.875, abs=0.5 / size)
        reference = np.asarray(val_transform(image), dtype=np.int16)
        boxed = np.asarray(image.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h)))
        assert np.abs(boxed - reference).max() <= 1  # PIL's own path: the same pixels, up to rounding
        image.save(photo.parent / "val.JPEG", quality=95)
        with Image.open(photo.parent / "val.JPEG") as saved:
            reference = np.asarray(val_transform(saved.convert("RGB")))
        fast = decode_crop(os.fsencode(photo.parent / "val.JPEG"), lambda w, h: center_crop_box(w, h, size), size)
        assert mean_diff(fast, reference) < 0.1


def test_augmentation_depends_only_on_seed_epoch_and_index(digits_dir):
    classes = check_layout(digits_dir).classes
    ds = ImageFolderDataset(digits_dir / "train", classes, True, 32, seed=7, min_crop_scale=0.35)
    first = ds[(3, 11)][0]
    assert torch.equal(first, ds[(3, 11)][0])
    assert not torch.equal(first, ds[(4, 11)][0])
    assert not torch.equal(first, ImageFolderDataset(digits_dir / "train", classes, True, 32, 8, 0.35)[(3, 11)][0])
    # The same batches come out whatever the number of loader workers.
    batches = {}
    for workers in (0, 2):
        sampler = TrainBatchSampler(len(ds), 16, 0, 1, seed=7)
        sampler.set_epoch(3, 64)
        batches[workers] = [b[0] for _, b in zip(range(3), make_loader(ds, sampler, workers, False), strict=False)]
    assert all(torch.equal(a, b) for a, b in zip(batches[0], batches[2], strict=True))
    assert sample_rng(7, 3, 11).random() == sample_rng(7, 3, 11).random()


@pytest.fixture
def odd_images_dir(tmp_path):
    """A class folder with the files real ImageNet contains: PNG named .JPEG, CMYK, grayscale, and broken ones."""
    folder = tmp_path / "train" / "n000"
    folder.mkdir(parents=True)
    add_odd_images(folder)
    Image.fromarray(load_sample_image("flower.jpg")).save(folder / "z_good.JPEG")
    shutil.copytree(tmp_path / "train", tmp_path / "val")
    return tmp_path


def test_odd_images_decode_and_broken_ones_are_skipped_and_reported(odd_images_dir):
    train = ImageFolderDataset(odd_images_dir / "train", ["n000"], True, 32, seed=0)
    for index in range(3):  # PNG, CMYK, grayscale: all decode to RGB
        image, label, skipped = train[(0, index)]
        assert image.shape == (32, 32, 3) and label == 0 and skipped == []
    image, label, skipped = train[(0, 3)]  # truncated, empty and text files are replaced by the next good one
    assert label == 0 and image.shape == (32, 32, 3)
    assert [s.split(" ")[0].rsplit("/", 1)[1] for s in skipped] == ["odd_d_truncated.JPEG", "odd_e_empty.JPEG",
                                                                 "odd_f_text.JPEG"]
    val = ImageFolderDataset(odd_images_dir / "val", ["n000"], False, 32, seed=0)
    batch = collate([val[(0, i)] for i in range(len(val))])
    assert batch[1].tolist() == [0, 0, 0, -1, -1, -1, 0]  # val leaves broken files out instead of substituting
    assert len(batch[2]) == 3


def make_class_dirs(root, split, classes, files=1):
    for c in classes:
        (root / split / c).mkdir(parents=True, exist_ok=True)
        for i in range(files):
            Image.new("RGB", (8, 8)).save(root / split / c / f"{i}.JPEG")


def test_layout_check_accepts_a_good_tree_and_counts_it(tmp_path):
    make_class_dirs(tmp_path, "train", ["a", "b"], files=3)
    make_class_dirs(tmp_path, "val", ["a", "b"])
    layout = check_layout(tmp_path)
    assert (layout.classes, layout.train_images, layout.val_images) == (["a", "b"], 6, 2)


@pytest.mark.parametrize("case, expected", [
    ("missing", "does not exist"),
    ("no_val", "has no val/ folder"),
    ("flat_val", "holds 3 images directly instead of class folders"),
    ("mismatch", "must hold the same class folders"),
    ("empty_train", "no images"),
])
def test_layout_check_explains_each_mistake(tmp_path, case, expected):
    root = tmp_path / "data"
    if case != "missing":
        make_class_dirs(root, "train", ["a", "b"], files=0 if case == "empty_train" else 1)
    if case == "flat_val":
        (root / "val").mkdir()
        for i in range(3):
            Image.new("RGB", (8, 8)).save(root / "val" / f"ILSVRC2012_val_{i:08d}.JPEG")
    elif case == "mismatch":
        make_class_dirs(root, "val", ["a", "c"])
    elif case == "empty_train":
        make_class_dirs(root, "val", ["a", "b"])
    with pytest.raises(DatasetLayoutError, match=expected) as err:
        check_layout(root)
    assert "prepare_imagenet.py" in str(err.value)


def test_progressive_resizing_grows_from_start_to_final_in_multiples_of_16():
    from data import progressive_image_size

    sizes = [progressive_image_size(e, 16, 160, 192) for e in range(16)]
    assert sizes[0] == 160 and sizes[-1] == 192 and sizes == sorted(sizes)
    assert all(s % 16 == 0 for s in sizes)
    assert [progressive_image_size(e, 16, 0, 224) for e in (0, 7, 15)] == [224, 224, 224]
    assert progressive_image_size(40, 16, 160, 192) == 192  # more epochs than planned: stay at the final size


def test_train_images_follow_the_epoch_size_and_val_keeps_its_own(digits_dir):
    classes = check_layout(digits_dir).classes
    train = ImageFolderDataset(digits_dir / "train", classes, True, 32, seed=0, start_image_size=16, epochs=3)
    assert [train[(e, 0)][0].shape[0] for e in range(3)] == [16, 32, 32]  # the middle 24 px rounds to 32
    val = ImageFolderDataset(digits_dir / "val", classes, False, 48, seed=0)
    assert val[(2, 0)][0].shape == (48, 48, 3)
