"""The GPU-decode input path, run on the CPU device: same augmentation as the CPU path, pixels within a
measured tolerance of it, odd and broken files handled and counted the same way."""

import csv
import dataclasses
import io
import shutil
import signal
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.utils._pytree as pytree
from conftest import FAST, REPO, add_odd_images
from PIL import Image
from sklearn.datasets import load_sample_image
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data._utils.pin_memory import pin_memory

from data import (
    ImageFolderDataset,
    Normalizer,
    TrainBatchSampler,
    center_crop_box,
    collate,
    decode_region,
    make_loader,
    random_resized_crop_box,
    sample_rng,
)
from gpu_decode import (
    DeviceBatchDecoder,
    EncodedImage,
    EncodedImageFolderDataset,
    collate_encoded,
    is_complete_jpeg,
    model_batch,
    on_device_route,
)

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

CPU = torch.device("cpu")
SIZE, SEED, MIN_SCALE = 64, 3, 0.08
# Mean absolute difference to the CPU path in normalized units (1.0 = one standard deviation, about 57 of 255
# levels). Measured over these 66 crops at 64 px: at most 0.061 per image, 0.037 averaged over the batch, the
# difference between roi_align's area average and PIL's triangle filter. A missing flip gives at least 0.27 per
# image, swapped channels 0.28, the box of another epoch 0.40, and a crop shifted by 4 px 0.45 on average.
IMAGE_TOLERANCE, BATCH_TOLERANCE = 0.1, 0.05
CLASSES = ["china", "flower"]
# (photo, region of it, saved size): textured crops, portrait and landscape, one with a side over 1024 px.
PHOTOS = [("china", (0, 0, 640, 427), (640, 427)), ("china", (100, 50, 400, 250), (300, 200)),
          ("china", (0, 150, 300, 427), (200, 300)), ("flower", (0, 0, 640, 427), (500, 375)),
          ("flower", (0, 0, 640, 427), (1400, 934)), ("flower", (200, 100, 500, 400), (375, 375))]


def jpeg_bytes(photo: str, size=(640, 427)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(load_sample_image(f"{photo}.jpg")).resize(size).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def broken_scan_jpeg() -> bytes:
    """Header, image data and end marker all present, but the scan names a component the frame lacks: only
    a full decode finds out, so it passes the workers' checks and fails on the decoding device."""
    data = bytearray(jpeg_bytes("china"))
    data[data.index(b"\xff\xda") + 5] = 9
    return bytes(data)


@pytest.fixture(scope="module")
def photos_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    sources = {name: Image.fromarray(load_sample_image(f"{name}.jpg")) for name in CLASSES}
    for i, (name, region, size) in enumerate(PHOTOS):
        for split in ("train", "val"):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            sources[name].crop(region).resize(size, Image.Resampling.BICUBIC).save(folder / f"{i}.JPEG", quality=90)
    return root


@pytest.fixture(scope="module")
def odd_dir(tmp_path_factory):
    """One class folder: PNG, CMYK, grayscale, three broken files (conftest's), a JPEG cut in half, one with a
    broken scan, and a good photo last."""
    root = tmp_path_factory.mktemp("odd")
    folder = root / "train" / "n000"
    folder.mkdir(parents=True)
    add_odd_images(folder)
    data = jpeg_bytes("flower")
    (folder / "odd_g_half.JPEG").write_bytes(data[:len(data) // 2])
    (folder / "odd_h_broken_scan.JPEG").write_bytes(broken_scan_jpeg())
    (folder / "z_good.JPEG").write_bytes(data)
    shutil.copytree(root / "train", root / "val")
    return root


def datasets(root, train, **kwargs):
    classes = sorted(p.name for p in (root / "train").iterdir())
    split = root / ("train" if train else "val")
    return (ImageFolderDataset(split, classes, train, SIZE, SEED, MIN_SCALE, **kwargs),
            EncodedImageFolderDataset(split, classes, train, SIZE, SEED, MIN_SCALE, **kwargs))


def both_paths(cpu_set, encoded_set, items, decoder=None):
    """(CPU path batch, GPU-decode path batch) as the training loop sees them, normalized on the CPU."""
    cpu_images, cpu_labels, cpu_skipped = collate([cpu_set[item] for item in items])
    batch, labels, skipped = collate_encoded([encoded_set[item] for item in items])
    return (model_batch(Normalizer(CPU), cpu_images, cpu_labels, cpu_skipped),
            model_batch(decoder or DeviceBatchDecoder(CPU), batch, labels, skipped))


def per_image_error(a, b):
    return (a - b).abs().mean(dim=(1, 2, 3))


def names(skipped):
    return sorted(s.split(" ")[0].rsplit("/", 1)[1] for s in skipped)


def test_crop_box_and_flip_are_the_cpu_paths(photos_dir):
    cpu_set, encoded_set = datasets(photos_dir, train=True)
    flips = set()
    for epoch in range(4):
        for index in range(len(encoded_set)):
            record = encoded_set.load(epoch, index)
            with Image.open(record.path) as img:
                width, height = img.size
            rng = sample_rng(SEED, epoch, index)
            box = random_resized_crop_box(rng, width, height, MIN_SCALE)
            flip = rng.random() < 0.5
            assert record.box == box and record.flip == flip and record.size == SIZE
            # ...and that box and flip are exactly what the CPU path used.
            expected = decode_region(cpu_set.paths[index], lambda w, h, box=box: box, SIZE)
            if flip:
                expected = expected.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            assert torch.equal(cpu_set.load(epoch, index), torch.from_numpy(np.array(expected)))
            flips.add(flip)
    assert flips == {True, False}
    cpu_val, encoded_val = datasets(photos_dir, train=False)
    for index in range(len(encoded_val)):
        record = encoded_val.load(5, index)
        with Image.open(record.path) as img:
            assert record.box == center_crop_box(*img.size, SIZE) and not record.flip
        expected = decode_region(cpu_val.paths[index], lambda w, h: center_crop_box(w, h, SIZE), SIZE)
        assert torch.equal(cpu_val.load(5, index), torch.from_numpy(np.array(expected)))


@pytest.mark.parametrize("max_side", [1024, 128])  # 128: every crop is downscaled on its own first
def test_decoded_batches_match_the_cpu_path_within_the_measured_tolerance(photos_dir, max_side):
    errors, flipped, swapped, other_box = [], [], [], []
    for train, epochs in ((True, range(10)), (False, [0])):
        cpu_set, encoded_set = datasets(photos_dir, train)
        decoder = DeviceBatchDecoder(CPU, max_side=max_side)
        for epoch in epochs:
            items = [(epoch, i) for i in range(len(cpu_set))]
            (expected, cpu_labels, _), (images, labels, skipped) = both_paths(cpu_set, encoded_set, items, decoder)
            assert torch.equal(labels, cpu_labels) and skipped == []
            errors.append(per_image_error(images, expected))
            flipped.append(per_image_error(images.flip(3), expected))
            swapped.append(per_image_error(images.flip(1), expected))  # RGB <-> BGR
            if train:  # the crop box of the next epoch, everything else the same
                moved = collate_encoded([
                    (dataclasses.replace(encoded_set[item][0], box=encoded_set[(epoch + 1, item[1])][0].box), 0, [])
                    for item in items])
                other_box.append(per_image_error(decoder.decode_batch(*moved)[0], expected))
            shift = per_image_error(torch.roll(images, SIZE // 16, 3), expected)
            assert shift.mean() > BATCH_TOLERANCE
    errors = torch.cat(errors)
    assert errors.max() < IMAGE_TOLERANCE and errors.mean() < BATCH_TOLERANCE
    assert all(torch.cat(wrong).min() > IMAGE_TOLERANCE for wrong in (flipped, swapped, other_box))


def test_odd_files_take_the_cpu_route_and_broken_ones_are_counted_like_the_cpu_path(odd_dir):
    cpu_set, encoded_set = datasets(odd_dir, train=True)
    files = [p.rsplit(b"/", 1)[1].decode() for p in encoded_set.paths]
    assert files[:3] == ["odd_a_png.JPEG", "odd_b_cmyk.JPEG", "odd_c_gray.JPEG"]
    for index in range(3):  # not RGB JPEGs: decoded in the worker, exactly as the CPU path does
        assert torch.equal(encoded_set.load(0, index), cpu_set.load(0, index))
    with pytest.raises(OSError):  # the half file has a good header but no end marker: the CPU path rejects it
        encoded_set.load(0, files.index("odd_g_half.JPEG"))
    assert isinstance(encoded_set.load(0, files.index("odd_h_broken_scan.JPEG")), EncodedImage)
    data = jpeg_bytes("flower")
    assert is_complete_jpeg(data + b"\0" * 16 + b"\r\n") and not is_complete_jpeg(data[:-2])

    items = [(0, i) for i in range(len(cpu_set))]
    (expected, cpu_labels, cpu_skipped), (images, labels, skipped) = both_paths(cpu_set, encoded_set, items)
    # Every broken file is met (and reported) as often as in the CPU path: the worker finds the empty, text
    # and truncated ones, the device decoder the broken scan; both substitute the good photo.
    assert names(skipped) == names(cpu_skipped) and len(skipped) == 15
    assert torch.equal(labels, cpu_labels)
    assert torch.equal(images[:3], expected[:3])
    assert per_image_error(images[3:], expected[3:]).max() < IMAGE_TOLERANCE

    cpu_val, encoded_val = datasets(odd_dir, train=False)
    (expected, cpu_labels, cpu_skipped), (images, labels, skipped) = both_paths(cpu_val, encoded_val, items)
    assert labels.tolist() == cpu_labels.tolist() == [0, 0, 0, -1, -1, -1, -1, -1, 0]
    assert names(skipped) == names(cpu_skipped) and len(skipped) == 5
    assert torch.equal(images[:-1], expected[:-1])  # the odd files and the blanks, to the bit
    assert per_image_error(images[-1:], expected[-1:]).max() < IMAGE_TOLERANCE



def test_decode_batch_returns_its_corrections_and_leaves_the_loaders_objects_alone(odd_dir):
    _, encoded_val = datasets(odd_dir, train=False)
    batch, labels, skipped = collate_encoded([encoded_val[(0, i)] for i in range(len(encoded_val))])
    given_labels, given_skipped = labels.clone(), list(skipped)
    decoder = DeviceBatchDecoder(CPU)
    images, new_labels, new_skipped = model_batch(decoder, batch, labels, skipped)
    assert torch.equal(labels, given_labels) and skipped == given_skipped  # the workers' verdicts, untouched
    assert given_labels.tolist() == [0, 0, 0, -1, -1, -1, -1, 0, 0]  # the broken scan passes the workers
    assert new_labels.tolist() == [0, 0, 0, -1, -1, -1, -1, -1, 0]  # ...and is blanked by the decoder
    assert new_skipped[:len(skipped)] == skipped and names(new_skipped[len(skipped):]) == ["odd_h_broken_scan.JPEG"]
    # The CPU path has nothing to correct: its labels and skipped pass through as they are.
    cpu_images = torch.zeros(2, SIZE, SIZE, 3, dtype=torch.uint8)
    x, cpu_labels, cpu_skipped = model_batch(Normalizer(CPU), cpu_images, given_labels, given_skipped)
    assert torch.equal(x, Normalizer(CPU)(cpu_images)) and cpu_labels is given_labels and cpu_skipped is given_skipped


def test_the_canvas_is_built_in_chunks_within_its_memory_budget_with_the_same_bits(photos_dir, odd_dir, monkeypatch):
    import torchvision.ops

    canvases = []
    real_roi_align = torchvision.ops.roi_align

    def recording_roi_align(canvas, *args, **kwargs):
        canvases.append(canvas.shape)
        return real_roi_align(canvas, *args, **kwargs)

    monkeypatch.setattr(torchvision.ops, "roi_align", recording_roi_align)
    # Three epochs of photos (one over 1024 px), the same with every crop downscaled first, and a batch with
    # a file that fails on the device and is replaced.
    for root, max_side in ((photos_dir, 1024), (photos_dir, 128), (odd_dir, 1024)):
        _, encoded_set = datasets(root, train=True)
        items = [(epoch, i) for epoch in range(3) for i in range(len(encoded_set))]
        batch, labels, skipped = collate_encoded([encoded_set[item] for item in items])
        canvases.clear()
        whole = DeviceBatchDecoder(CPU, max_side=max_side, canvas_bytes=2**40).decode_batch(batch, labels, skipped)
        [(count, _, height, width)] = canvases
        per_image = 3 * height * width * 4  # float32
        for budget, chunk in ((1, 1), (2 * per_image + 1, 2), (5 * per_image, 5)):
            canvases.clear()
            decoder = DeviceBatchDecoder(CPU, max_side=max_side, canvas_bytes=budget)
            images, new_labels, new_skipped = decoder.decode_batch(batch, labels, skipped)
            assert torch.equal(images, whole[0]) and torch.equal(new_labels, whole[1]) and new_skipped == whole[2]
            assert [c[0] for c in canvases] == [chunk] * (count // chunk) + [count % chunk] * (count % chunk > 0)
            assert all(c[2:] == (height, width) and c.numel() * 4 <= max(budget, per_image) for c in canvases)
    assert count < len(items)  # the odd batch: the files the workers decoded never reach the canvas


def test_output_is_normalized_float_channels_last_at_the_epochs_size(odd_dir):
    assert_normalized_channels_last_at_the_epochs_size(DeviceBatchDecoder(CPU), odd_dir)


def assert_normalized_channels_last_at_the_epochs_size(decoder, odd_dir):
    """What train.py's step takes from any route, with progressive resizing, on a batch both workers and the
    decoder fill."""
    _, encoded_set = datasets(odd_dir, train=True, start_image_size=32, epochs=3)
    for epoch, size in enumerate([32, 48, 64]):
        batch, labels, skipped = collate_encoded([encoded_set[(epoch, i)] for i in range(len(encoded_set))])
        assert len(batch.lengths) > 0 and len(batch.decoded) > 0  # both routes in the batch
        images, _, _ = decoder.decode_batch(batch, labels, skipped)
        assert images.shape == (len(encoded_set), 3, size, size) and images.dtype == torch.float32
        assert images.device == CPU and images.is_contiguous(memory_format=torch.channels_last)
        assert -2.2 < images.min() and images.max() < 2.7  # (0 - mean) / std ... (1 - mean) / std


def test_a_loader_with_a_worker_delivers_the_same_batches(photos_dir):
    _, encoded_set = datasets(photos_dir, train=True)
    decoder = DeviceBatchDecoder(CPU)
    out = {}
    for workers in (0, 1):
        sampler = TrainBatchSampler(len(encoded_set), 2, 0, 1, seed=SEED)
        sampler.set_epoch(2)
        out[workers] = []
        for batch, labels, skipped in make_loader(encoded_set, sampler, workers, False, collate_fn=collate_encoded):
            out[workers].append(decoder.decode_batch(batch, labels, skipped)[:2])
    assert len(out[1]) == 3
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(out[0], out[1], strict=True))


def test_a_device_share_sends_that_fraction_of_images_to_the_workers_in_every_stretch_of_the_dataset(photos_dir):
    for share in (0.0, 0.1, 0.25, 0.5, 0.9, 1.0):
        route = np.array([on_device_route(i, share) for i in range(1_300_000)])
        for stretch in (route, route[:100], route[640_000:640_050]):
            assert abs(stretch.mean() - share) <= 3 / len(stretch)
    cpu_set, _ = datasets(photos_dir, train=True)
    classes = sorted(p.name for p in (photos_dir / "train").iterdir())
    items = [(epoch, i) for epoch in range(3) for i in range(len(cpu_set))]
    for share in (0.0, 0.5, 1.0):
        encoded_set = EncodedImageFolderDataset(photos_dir / "train", classes, True, SIZE, SEED, MIN_SCALE,
                                                device_share=share)
        on_device = [i for i in range(len(cpu_set)) if on_device_route(i, share)]
        for epoch, index in items[:len(cpu_set)]:
            record = encoded_set.load(epoch, index)
            if index in on_device:
                assert isinstance(record, EncodedImage)
            else:  # the CPU path's own pixels
                assert torch.equal(record, cpu_set.load(epoch, index))
        (expected, cpu_labels, _), (images, labels, skipped) = both_paths(cpu_set, encoded_set, items)
        assert torch.equal(labels, cpu_labels) and skipped == []
        errors = per_image_error(images, expected)
        assert errors.max() < IMAGE_TOLERANCE and errors.mean() < BATCH_TOLERANCE
        off_device = [n for n, (_, i) in enumerate(items) if i not in on_device]
        assert torch.equal(images[off_device], expected[off_device])
        assert len(on_device) == {0.0: 0, 0.5: 4, 1.0: 6}[share]  # 0.5: both routes within each batch


def test_files_the_decoder_rejects_fall_back_to_pil_or_are_replaced(tmp_path, monkeypatch):
    import torchvision.io

    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        (tmp_path / split / "b").mkdir(parents=True)
        (tmp_path / split / "a" / "0.JPEG").write_bytes(jpeg_bytes("china"))
        (tmp_path / split / "a" / "1.JPEG").write_bytes(broken_scan_jpeg())
        (tmp_path / split / "b" / "2.JPEG").write_bytes(jpeg_bytes("flower", (1200, 800)))
    # Pretend the device decoder cannot read the flower, which PIL can: the batched call fails anyway
    # because of the broken scan, then each file is decoded on its own.
    flower_length = len(jpeg_bytes("flower", (1200, 800)))
    real_decode_jpeg = torchvision.io.decode_jpeg

    def decode_jpeg(data, **kwargs):
        if isinstance(data, torch.Tensor) and len(data) == flower_length:
            raise RuntimeError("unsupported by this decoder")
        return real_decode_jpeg(data, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", decode_jpeg)
    items = [(0, i) for i in range(3)]
    cpu_set, encoded_set = datasets(tmp_path, train=True)
    with pytest.warns(RuntimeWarning, match="2.JPEG .*decoded it with PIL"):
        (expected, _, _), (images, labels, skipped) = both_paths(cpu_set, encoded_set, items)
    assert names(skipped) == ["1.JPEG"]
    assert labels.tolist() == [0, 1, 1] and torch.equal(images[1], images[2])  # replaced by the next image
    assert per_image_error(images[[0, 2]], expected[[0, 2]]).max() < IMAGE_TOLERANCE

    cpu_val, encoded_val = datasets(tmp_path, train=False)
    with pytest.warns(RuntimeWarning):
        (expected, _, _), (images, labels, skipped) = both_paths(cpu_val, encoded_val, items)
    assert names(skipped) == ["1.JPEG"] and labels.tolist() == [0, -1, 1]
    assert torch.equal(images[1], Normalizer(CPU)(torch.zeros(1, SIZE, SIZE, 3, dtype=torch.uint8))[0])
    assert per_image_error(images[[0, 2]], expected[[0, 2]]).max() < IMAGE_TOLERANCE


def forced_device_decode(*args) -> list[str]:
    """train.py with --decode gpu (half of the JPEGs decoded on the device) taking effect on the CPU device,
    as it would on a GPU."""
    args = [str(a) for a in (*args, "--decode", "gpu", "--gpu-decode-share", "0.5")]
    return [sys.executable, "-c", f"""
import sys, engine, gpu_decode, train
engine.decode_on_device = lambda *_: True
files, decode = [0], gpu_decode.DeviceBatchDecoder.decode
def counting_decode(self, batch):
    files[0] += len(batch.lengths)
    return decode(self, batch)
gpu_decode.DeviceBatchDecoder.decode = counting_decode
code = train.main({args!r})
print(f"files decoded on the device: {{files[0]}}")
sys.exit(code)
"""]


def test_train_py_on_device_decoded_batches_counts_like_the_cpu_path_learns_and_resumes_exactly(digits_dir,
                                                                                                   tmp_path):
    """train.py's loop on the device-decode path (forced on, on the CPU), half of the images decoded by the
    workers: broken files are skipped and counted exactly as the CPU path counts them (tests/test_faults.py),
    it learns, and a run stopped by SIGTERM and rerun ends bit-identical to an uninterrupted one
    (tests/test_resume.py's flags)."""
    stdout = run_counted_and_resumed(forced_device_decode, digits_dir, tmp_path)
    assert "there is no GPU" not in stdout
    # 2 epochs of 1,408 training and 363 val images: about half of them take the device route.
    device_decoded = int(stdout.rsplit("files decoded on the device: ", 1)[1])
    assert 0.4 < device_decoded / (2 * (1408 + 363)) < 0.6


def run_counted_and_resumed(command, digits_dir, tmp_path) -> str:
    """Runs command(*train.py flags) on RGB digits with odd files added, checks that broken files are counted
    as the CPU path counts them (tests/test_faults.py) and that it learns, then that a run stopped by SIGTERM
    and rerun ends bit-identical (tests/test_resume.py's flags). Returns the uninterrupted run's stdout."""
    from test_faults import expected_train_skips
    from test_resume import ARGS, assert_same_run, wait_for_new_checkpoint

    data = tmp_path / "data"
    shutil.copytree(digits_dir, data)
    for path in data.glob("*/*/*.jpg"):  # the digits are grayscale JPEGs, which the device routes leave out
        with Image.open(path) as img:
            img.convert("RGB").save(path, quality=95)
    names = add_odd_images(data / "train" / "digit_3")
    add_odd_images(data / "val" / "digit_7")
    reference = tmp_path / "uninterrupted"
    done = subprocess.run(command("--data-dir", data, "--output-dir", reference, *ARGS),
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr

    train_names = sorted(p.name for p in (data / "train" / "digit_3").iterdir())
    first = sum(len(list((data / "train" / f"digit_{c}").iterdir())) for c in range(3))
    broken = {first + train_names.index(n) for n in names}
    with open(reference / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["val_images"]) for r in rows] == [363, 363]
    assert [int(r["skipped_images"]) for r in rows] == [expected_train_skips(1443, broken, e) + 3 for e in (0, 1)]
    assert float(rows[-1]["val_acc1"]) > 30  # 10 classes: chance is 10%

    out = tmp_path / "interrupted"
    proc = subprocess.Popen(command("--data-dir", data, "--output-dir", out, *ARGS), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_new_checkpoint(out, proc, None)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Stopped by SIGTERM" in stdout, stderr
    again = subprocess.run(command("--data-dir", data, "--output-dir", out, *ARGS),
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "Resuming" in again.stdout, again.stderr
    assert_same_run(out, reference)
    return done.stdout


def test_a_new_cpu_run_times_its_threads_on_device_decoded_batches(digits_dir, monkeypatch):
    """measure_threads feeds its trial steps as the training loop does, through model_batch."""
    import engine
    from config import parse_config
    from runtime import Runtime

    monkeypatch.setattr(engine, "decode_route", lambda requested, device: (requested, "forced"))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(engine, "cores_per_process", lambda rt: 2)
    at = FAST.index("--threads")
    cfg = parse_config(["--data-dir", str(digits_dir), *FAST[:at], *FAST[at + 2:], "--decode", "gpu"])
    classes = sorted(p.name for p in (digits_dir / "train").iterdir())
    rt = Runtime(device=CPU)
    data = engine.build_data(cfg, classes, rt, workers=1, with_val=False)
    assert isinstance(data.to_model_input, DeviceBatchDecoder)
    training = engine.build_training(engine.build_model(cfg, len(classes)), cfg, rt)
    before = torch.get_num_threads()
    try:
        threads, reason, _ = engine.measure_threads(training, data, rt, workers=1, steps=1)
    finally:
        torch.set_num_threads(before)
    assert threads in (1, 2) and "a step took" in reason


def test_decode_gpu_without_a_gpu_falls_back_to_the_workers(capsys):
    import engine

    dataset, collate_fn, pin, prepare = engine.input_pipeline("gpu", CPU, 0.5)
    assert (dataset, collate_fn, pin, type(prepare)) == (ImageFolderDataset, collate, False, Normalizer)
    assert "there is no GPU, so the loader workers decode the JPEGs" in capsys.readouterr().out


class GpuCopies(TorchDispatchMode):
    """Runs code as if on a GPU, without one, and records each copy it makes from host memory to the GPU or
    back, with whether the host goes on without waiting for the GPU: only a copy to the GPU from pinned
    memory with non_blocking=True does. Tensors made on "cuda" are FakeTensorMode's (shapes, dtypes and
    devices, no data); operations on host tensors alone run for real, so host-side work is unchanged. An
    operation given a GPU tensor and a host tensor (an index, say) copies the host one, and waits. Pinning
    needs a GPU: pin_memory is answered with a copy that this mode remembers as pinned."""

    def __init__(self):
        super().__init__()
        self.fake = FakeTensorMode(allow_non_fake_inputs=True)
        self.pinned: list[torch.Tensor] = []  # kept alive, so that no other tensor can take one's place
        self.copies: list[tuple[str, bool]] = []  # (operator, the host goes on without waiting)

    def __enter__(self):
        self.fake.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        return self.fake.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if func is torch.ops.aten.is_pinned.default:
            return any(args[0] is t for t in self.pinned)
        if func is torch.ops.aten._pin_memory.default:
            with unset_fake_temporarily():
                self.pinned.append(args[0].clone())
            return self.pinned[-1]
        target = torch.device(kwargs["device"]) if kwargs.get("device") else None
        if (target is None or target.type == "cpu") and all(t.device.type == "cpu" for t in tensors):
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        if func is torch.ops.aten._to_copy.default and target not in (None, args[0].device):
            pinned = any(args[0] is t for t in self.pinned)
            self.copies.append((str(func), target.type == "cuda" and pinned and kwargs.get("non_blocking", False)))
        elif func is torch.ops.aten.copy_.default and args[0].device != args[1].device:
            non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
            pinned = any(args[1] is t for t in self.pinned)
            self.copies.append((str(func), args[0].device.type == "cuda" and pinned and non_blocking))
        elif any(t.device.type == "cpu" and t.dim() > 0 for t in tensors):
            self.copies.append((str(func), False))
        return func(*args, **kwargs)


def step_loop_copies(route: str, root, monkeypatch) -> list[tuple[str, bool]]:
    """The GPU copies of train.py's step loop (model_batch, then the labels to the device) over two training
    batches of root's files, half of them decoded by the workers, on the input pipeline that --decode `route`
    builds for a GPU, whose loader pins batches where it is told to (DataLoader's pin_memory)."""
    import engine

    gpu = torch.device("cuda", 0)
    # A CUDA stream cannot exist here: the drain before nvJPEG (DeviceBatchDecoder.decode) is no copy.
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: SimpleNamespace(synchronize=lambda: None))
    copies = GpuCopies()
    with copies:
        dataset, collate_fn, pin, decoder = engine.input_pipeline(route, gpu, 0.5)
        classes = sorted(p.name for p in (root / "train").iterdir())
        train_set = dataset(root / "train", classes, True, SIZE, SEED, MIN_SCALE)
        batches = [collate_fn([train_set[(epoch, i)] for i in range(len(train_set))]) for epoch in (0, 1)]
        copies.copies.clear()  # the decoder's constants went to the GPU once, before the loop
        for batch, labels, skipped in batches:
            if pin:
                batch, labels, skipped = pin_memory((batch, labels, skipped))  # the loader's pinning thread
            x, labels, skipped = model_batch(decoder, batch, labels, skipped)
            labels = labels.to(gpu, non_blocking=True)
            assert x.device == labels.device == gpu and x.shape == (len(train_set), 3, SIZE, SIZE)
    return copies.copies


def fake_nvjpeg(files, mode, device):
    """torchvision's decode_jpeg on a GPU, which cannot run here: images of each file's size on the device."""
    sizes = [Image.open(io.BytesIO(data.numpy().tobytes())).size for data in files]
    return [torch.empty(3, height, width, dtype=torch.uint8, device=device) for width, height in sizes]


def test_the_step_loop_copies_to_the_gpu_without_waiting_for_it(photos_dir, monkeypatch):
    """Every host tensor the nvJPEG route sends to the GPU in the step loop, the labels included, goes from
    pinned memory without blocking: a blocking copy waits for every step queued before it."""
    import torchvision.io

    monkeypatch.setattr(torchvision.io, "decode_jpeg", fake_nvjpeg)
    copies = step_loop_copies("gpu", photos_dir, monkeypatch)
    # Per batch: labels, the workers' images and their positions, positions, flips, canvas indices, windows.
    assert len(copies) >= 2 * 7
    assert [copy for copy in copies if not copy[1]] == []
