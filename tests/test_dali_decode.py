"""The DALI input path, run on DALI's CPU operators (the same pipeline as on a GPU, "cpu" decoder instead of
"mixed"): the CPU path's windows and flips, pixels within a measured tolerance of it, odd and broken files
handled and counted the same way, and train.py on it learning and resuming bit for bit. Only the choice that
--decode auto makes runs without nvidia-dali installed (requirements-dali.txt; requirements-dev.txt has it)."""

import dataclasses
import subprocess
import sys
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import test_gpu_decode
import torch
from conftest import FAST, REPO
from PIL import Image
from test_gpu_decode import (
    CPU,
    SIZE,
    assert_normalized_channels_last_at_the_epochs_size,
    both_paths,
    datasets,
    jpeg_bytes,
    names,
    per_image_error,
    run_counted_and_resumed,
    step_loop_copies,
)

import engine
from config import UsageError, parse_config
from dali_decode import DaliBatchDecoder, dali_missing, slice_and_roi
from data import ImageFolderDataset, Normalizer, collate
from gpu_decode import collate_encoded
from outputs import data_wait_advice

needs_dali = pytest.mark.skipif(dali_missing() is not None,
                                reason=f"nvidia-dali is not installed ({dali_missing()}); "
                                       f"pip install -r requirements-dali.txt")
# test_gpu_decode's photos and odd files, so both device routes are held to the same data.
photos_dir, odd_dir = test_gpu_decode.photos_dir, test_gpu_decode.odd_dir
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

# Mean absolute difference in normalized units (1.0 = one standard deviation, about 57 of 255 levels), measured
# over the 66 crops at 64 px of test_gpu_decode's photos. To PIL decoding the whole file and resizing the same
# window: at most 0.0042 per image, 0.0025 on average (0.14 grey levels), so window, flip and filter are PIL's.
# To the CPU path, whose crops are torchvision's: at most 0.0043 per image, 0.0025 on average. A missing flip
# gives at least 0.27 per image, swapped channels 0.27, the window of another epoch 0.39.
PIL_TOLERANCE = 0.01
IMAGE_TOLERANCE, BATCH_TOLERANCE = 0.01, 0.005


def full_decode(path: str, box, flip: bool, size: int) -> torch.Tensor:
    """PIL's reference: the whole file decoded, the window resized with the CPU path's filter."""
    with Image.open(path) as img:
        left, top, width, height = box
        img = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR,
                                        box=(left, top, left + width, top + height))
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.array(img))


def test_windows_become_whole_pixel_slices_and_a_subpixel_resize_region():
    anchor, shape, start, end = slice_and_roi((10.25, 3.5, 100.5, 100.5))
    assert anchor == [10, 3] and shape == [101, 101]  # x, y: the decoder's order
    assert start == [0.5, 0.25] and end == [101.0, 100.75]  # y, x: the resize's, inside the slice
    assert slice_and_roi((0, 0, 640, 427)) == ([0, 0], [640, 427], [0, 0], [427, 640])


@needs_dali
def test_crops_are_pils_on_the_same_windows_and_within_the_measured_tolerance_of_the_cpu_path(photos_dir):
    decoder = DaliBatchDecoder(CPU)
    to_pil, to_cpu, flipped, swapped, other_box = [], [], [], [], []
    for train, epochs in ((True, range(10)), (False, [0])):  # val windows have fractional corners
        cpu_set, encoded_set = datasets(photos_dir, train)
        for epoch in epochs:
            items = [(epoch, i) for i in range(len(cpu_set))]
            (expected, cpu_labels, _), (images, labels, skipped) = both_paths(cpu_set, encoded_set, items, decoder)
            assert torch.equal(labels, cpu_labels) and skipped == []
            assert images.dtype == torch.float32 and images.is_contiguous(memory_format=torch.channels_last)
            records = [encoded_set[item][0] for item in items]
            reference = Normalizer(CPU)(torch.stack([full_decode(r.path, r.box, r.flip, SIZE) for r in records]))
            to_pil.append(per_image_error(images, reference))
            to_cpu.append(per_image_error(images, expected))
            flipped.append(per_image_error(images.flip(3), expected))
            swapped.append(per_image_error(images.flip(1), expected))  # RGB <-> BGR
            if train:  # the window of the next epoch, everything else the same
                moved = collate_encoded([
                    (dataclasses.replace(r, box=encoded_set[(epoch + 1, i)][0].box), 0, [])
                    for r, (_, i) in zip(records, items, strict=True)])
                other_box.append(per_image_error(decoder.decode_batch(*moved)[0], expected))
    to_pil, to_cpu = torch.cat(to_pil), torch.cat(to_cpu)
    assert to_pil.max() < PIL_TOLERANCE
    assert to_cpu.max() < IMAGE_TOLERANCE and to_cpu.mean() < BATCH_TOLERANCE
    assert all(torch.cat(wrong).min() > IMAGE_TOLERANCE for wrong in (flipped, swapped, other_box))


@needs_dali
def test_odd_files_take_the_cpu_route_and_broken_ones_are_counted_like_the_cpu_path(odd_dir):
    """PNG, CMYK and grayscale files are decoded by the worker exactly as the CPU path does; the empty, text,
    truncated and half files fail there; the broken scan passes the worker's checks and fails in DALI, whose
    pipeline is then rebuilt. Each is met and reported as often as in the CPU path, and replaced the same way."""
    decoder = DaliBatchDecoder(CPU)
    cpu_set, encoded_set = datasets(odd_dir, train=True)
    items = [(0, i) for i in range(len(cpu_set))]
    (expected, cpu_labels, cpu_skipped), (images, labels, skipped) = both_paths(cpu_set, encoded_set, items, decoder)
    assert names(skipped) == names(cpu_skipped) and len(skipped) == 15
    assert sum("odd_h_broken_scan" in line for line in skipped) == 5  # found by DALI, confirmed by PIL
    assert torch.equal(labels, cpu_labels)
    assert torch.equal(images[:3], expected[:3])
    assert per_image_error(images[3:], expected[3:]).max() < IMAGE_TOLERANCE

    cpu_val, encoded_val = datasets(odd_dir, train=False)
    (expected, cpu_labels, cpu_skipped), (images, labels, skipped) = both_paths(cpu_val, encoded_val, items, decoder)
    assert labels.tolist() == cpu_labels.tolist() == [0, 0, 0, -1, -1, -1, -1, -1, 0]
    assert names(skipped) == names(cpu_skipped) and len(skipped) == 5
    assert torch.equal(images[:-1], expected[:-1])  # the odd files and the blanks, to the bit
    assert per_image_error(images[-1:], expected[-1:]).max() < IMAGE_TOLERANCE


@needs_dali
def test_a_file_dali_rejects_and_pil_reads_is_decoded_by_pil(tmp_path, monkeypatch):
    for name, photo in (("0.JPEG", "china"), ("1.JPEG", "flower")):
        (tmp_path / "train" / "a").mkdir(parents=True, exist_ok=True)
        (tmp_path / "train" / "a" / name).write_bytes(jpeg_bytes(photo))
    rejected = len(jpeg_bytes("flower"))
    real_run = DaliBatchDecoder.run

    def run(self, files, *args):
        if any(len(data) == rejected for data in files):
            self.pipeline = None
            raise RuntimeError("Critical error in pipeline:\nunsupported by this decoder")
        return real_run(self, files, *args)

    monkeypatch.setattr(DaliBatchDecoder, "run", run)
    cpu_set, encoded_set = datasets(tmp_path, train=True)
    with pytest.warns(RuntimeWarning, match="1.JPEG; decoded it with PIL on the CPU"):
        (expected, _, _), (images, labels, skipped) = both_paths(cpu_set, encoded_set, [(0, 0), (0, 1)],
                                                                 DaliBatchDecoder(CPU))
    assert skipped == [] and labels.tolist() == [0, 0]
    record = encoded_set[(0, 1)][0]
    assert torch.equal(images[1], Normalizer(CPU)(full_decode(record.path, record.box, record.flip, SIZE)[None])[0])
    assert per_image_error(images, expected).max() < IMAGE_TOLERANCE


@needs_dali
def test_output_is_normalized_float_channels_last_at_the_epochs_size(odd_dir):
    assert_normalized_channels_last_at_the_epochs_size(DaliBatchDecoder(CPU), odd_dir)


def forced_dali_decode(*args) -> list[str]:
    """train.py with the DALI route taking effect on the CPU device, as --decode auto takes it on a GPU."""
    args = [str(a) for a in args]
    return [sys.executable, "-c", f"""
import sys, dali_decode, engine, train
engine.decode_route = lambda requested, device: ("dali", "JPEGs are decoded with DALI (forced on the CPU).")
files, run = [0], dali_decode.DaliBatchDecoder.run
def counting_run(self, batch_files, *args):
    files[0] += len(batch_files)
    return run(self, batch_files, *args)
dali_decode.DaliBatchDecoder.run = counting_run
code = train.main({args!r})
print(f"files decoded by DALI: {{files[0]}}")
sys.exit(code)
"""]


@needs_dali
def test_train_py_on_dali_decoded_batches_counts_like_the_cpu_path_learns_and_resumes_exactly(digits_dir, tmp_path):
    """train.py's loop on the DALI route (forced on, on the CPU): counts, learning and exact resume as
    test_gpu_decode checks them for the nvJPEG route."""
    stdout = run_counted_and_resumed(forced_dali_decode, digits_dir, tmp_path)
    assert "JPEGs are decoded with DALI (forced on the CPU)." in stdout
    # 2 epochs of 1,440 training and 363 val images: all but the 6 odd files of each split go to DALI.
    assert int(stdout.rsplit("files decoded by DALI: ", 1)[1]) == 2 * (1440 + 363 - 6)


@pytest.fixture
def gpus(monkeypatch) -> dict:
    """Stubs what cannot exist here, what a GPU and its driver report: the properties torch reads from device
    i, and NVML's answer to nvmlDeviceGetJpgUtilization for the GPU of that UUID. Returns the dict to fill:
    device index -> (name, answer), answer a [utilization, sampling period] list or an NVML error code."""
    import pynvml

    reports = {}
    uuid = "6b1a9c2e-0f3d-4e5a-8b7c-00000000000{}".format
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: SimpleNamespace(name=reports[index][0], uuid=uuid(index)))
    monkeypatch.setattr(pynvml, "nvmlInit", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlShutdown", lambda: None)

    def handle_by_uuid(asked: str) -> int:
        for index in reports:
            if asked == f"GPU-{uuid(index)}":
                return index
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)

    def jpg_utilization(handle: int) -> list[int]:
        answer = reports[handle][1]
        if isinstance(answer, int):
            raise pynvml.NVMLError(answer)
        return answer

    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByUUID", handle_by_uuid)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetJpgUtilization", jpg_utilization)
    return reports


def test_decode_auto_takes_dali_only_on_a_gpu_whose_driver_reports_jpeg_engines(gpus, monkeypatch):
    import pynvml

    monkeypatch.setattr(engine, "dali_missing", lambda: None)
    gpus[0] = ("NVIDIA H100 80GB HBM3", [0, 166666])
    gpus[1] = ("Tesla T4", pynvml.NVML_ERROR_NOT_SUPPORTED)
    h100, t4 = torch.device("cuda", 0), torch.device("cuda", 1)
    assert engine.decode_route("auto", h100) == (
        "dali", "--decode auto: NVIDIA DALI decodes the JPEGs on the GPU's hardware JPEG decoder (NVML reports JPEG "
                "decoder engines on the NVIDIA H100 80GB HBM3).")
    assert engine.decode_route("auto", t4) == (
        "cpu", "--decode auto: the loader workers decode the JPEGs: NVML reports no JPEG decoder engine on the "
               "Tesla T4, so DALI would decode them on the CUDA cores that training uses (--decode dali or gpu does "
               "that anyway).")
    # What is asked for is done, engines or not.
    assert [engine.decode_route(requested, t4)[0] for requested in ("dali", "gpu", "cpu")] == ["dali", "gpu", "cpu"]
    # A device without an index is the current one, as the epoch summary's advice passes it.
    assert engine.decode_route("auto", torch.device("cuda"))[0] == "dali"
    assert "more --workers than 15" in data_wait_advice(0.3, "auto", 1.0, "cuda", 15)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert engine.decode_route("auto", torch.device("cuda"))[0] == "cpu"
    assert "try --decode gpu or dali" in data_wait_advice(0.3, "auto", 1.0, "cuda", 15)


def test_decode_auto_leaves_the_jpegs_to_the_workers_where_the_engines_cannot_be_found_out(gpus, monkeypatch):
    import pynvml

    monkeypatch.setattr(engine, "dali_missing", lambda: None)
    gpus[0] = ("Tesla V100-SXM2-16GB", pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)  # a driver older than the query
    unknown = ("--decode auto: the loader workers decode the JPEGs, since whether this GPU has a hardware JPEG "
               "decoder is unknown ({}); --decode dali uses DALI anyway.")
    gpu = torch.device("cuda", 0)
    assert engine.decode_route("auto", gpu) == (
        "cpu", unknown.format("NVML could not tell for the Tesla V100-SXM2-16GB: Function Not Found"))
    monkeypatch.setattr(torch.cuda, "get_device_properties",  # a MIG slice's UUID is no GPU's
                        lambda index: SimpleNamespace(name="NVIDIA A100-SXM4-40GB MIG 1g.5gb", uuid="0" * 36))
    assert engine.decode_route("auto", gpu) == (
        "cpu", unknown.format("NVML could not tell for the NVIDIA A100-SXM4-40GB MIG 1g.5gb: Not Found"))

    def no_library():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", no_library)
    assert engine.decode_route("auto", gpu) == (
        "cpu", unknown.format("NVML cannot be used here: NVML Shared Library Not Found"))
    monkeypatch.delattr(pynvml, "nvmlDeviceGetJpgUtilization")
    assert engine.decode_route("auto", gpu) == ("cpu", unknown.format(
        "the installed pynvml predates nvmlDeviceGetJpgUtilization (pip install -r requirements-dali.txt)"))
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed
    assert engine.decode_route("auto", gpu) == ("cpu", unknown.format(
        "nvidia-ml-py, which asks the driver, is not installed (pip install -r requirements-dali.txt)"))


def test_decode_auto_takes_the_workers_without_a_gpu_or_without_dali(gpus, monkeypatch, capsys):
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    gpus[0] = ("NVIDIA H100 80GB HBM3", [0, 166666])
    assert parse_config([]).decode == "auto" and parse_config(["--decode", "dali"]).decode == "dali"
    monkeypatch.setattr(engine, "dali_missing", lambda: None)
    for requested in ("auto", "dali", "gpu"):  # nothing to decode on: the workers, whatever is installed
        route, why = engine.decode_route(requested, cpu)
        assert route == "cpu" and why.startswith(f"--decode {requested}: there is no GPU, so the loader workers")

    monkeypatch.setattr(engine, "dali_missing", lambda: "ModuleNotFoundError: No module named 'nvidia'")
    route, why = engine.decode_route("auto", gpu)
    assert route == "cpu" and "DALI is not installed" in why and "requirements-dali.txt" in why
    with pytest.raises(UsageError, match=r"--decode dali needs NVIDIA DALI.*No module named 'nvidia'.*"
                                         r"pip install -r requirements-dali.txt"):
        engine.decode_route("dali", gpu)
    assert engine.decode_route("gpu", gpu)[0] == "gpu"
    # The epoch summary's advice follows the route taken: here the workers decode, so a GPU route is the advice.
    assert "try --decode gpu or dali" in data_wait_advice(0.3, "auto", 1.0, "cuda", 15)
    monkeypatch.setattr(engine, "dali_missing", lambda: None)
    assert "more --workers than 15" in data_wait_advice(0.3, "auto", 1.0, "cuda", 15)
    assert "raise --gpu-decode-share above 0.5" in data_wait_advice(0.3, "auto", 0.5, "cuda", 15)

    capsys.readouterr()
    dataset, collate_fn, pin, prepare = engine.input_pipeline("auto", cpu, 1.0)
    assert (dataset, collate_fn, pin, type(prepare)) == (ImageFolderDataset, collate, False, Normalizer)
    assert capsys.readouterr().out == "--decode auto: there is no GPU, so the loader workers decode the JPEGs.\n"


@needs_dali
def test_the_dali_step_loop_copies_to_the_gpu_without_waiting_for_it(photos_dir, monkeypatch):
    """test_gpu_decode's check on the DALI route: nothing the step loop sends to the GPU blocks."""
    def mixed_decoder(self, files, boxes, flips, size):
        """DALI's pipeline on a GPU, which cannot run here: crops of the batch's size on the device."""
        return torch.empty(len(files), size, size, 3, device=self.device)

    monkeypatch.setattr(DaliBatchDecoder, "run", mixed_decoder)
    copies = step_loop_copies("dali", photos_dir, monkeypatch)
    assert len(copies) >= 2 * 4  # per batch: labels, the workers' images and their positions, DALI's positions
    assert [copy for copy in copies if not copy[1]] == []


def failing_pipeline_build(self):
    """What a DALI that does not match the driver does when the pipeline is built (the message ends with DALI's
    stack trace)."""
    raise RuntimeError("CUDA driver version is insufficient for CUDA runtime version\nStacktrace (2 entries):\n"
                       "[frame 0]: libdali.so\n[frame 1]: libdali.so")


@needs_dali
def test_a_pipeline_that_cannot_be_built_ends_the_run_once_instead_of_decoding_every_file_with_pil(photos_dir,
                                                                                                   monkeypatch):
    """No file is to blame: one build is tried, nothing falls back to PIL and no warning is given per file;
    the UsageError (exit 2 in train.py) says what failed and what to pass instead."""
    from nvidia.dali import Pipeline

    builds, pil_decodes = [], []
    monkeypatch.setattr(Pipeline, "build", lambda self: builds.append(self) or failing_pipeline_build(self))
    monkeypatch.setattr(DaliBatchDecoder, "decode_with_pil", lambda *args: pil_decodes.append(args))
    _, encoded_set = datasets(photos_dir, train=True)
    batch = collate_encoded([encoded_set[(0, i)] for i in range(len(encoded_set))])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a warning per file would fail here
        with pytest.raises(UsageError) as raised:
            DaliBatchDecoder(CPU).decode_batch(*batch)
    assert len(builds) == 1 and pil_decodes == []
    message = str(raised.value)
    assert message.startswith("NVIDIA DALI could not build its decoding pipeline on cpu (RuntimeError: CUDA driver "
                              "version is insufficient for CUDA runtime version).")
    assert "--decode cpu" in message and "--decode gpu" in message and "requirements-dali.txt" in message
    assert "Stacktrace" not in message and "\n" not in message


@needs_dali
def test_train_py_stops_with_exit_2_and_one_paragraph_when_dali_cannot_build_its_pipeline(tmp_path):
    rng = np.random.default_rng(0)
    for split, count in (("train", 40), ("val", 8)):
        for label in ("a", "b"):
            (tmp_path / "data" / split / label).mkdir(parents=True)
            for i in range(count // 2):  # RGB JPEGs: the ones the DALI route decodes
                Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(
                    tmp_path / "data" / split / label / f"{i}.jpg")
    args = ["--data-dir", tmp_path / "data", "--output-dir", tmp_path / "out", "--epochs", "1", *FAST]
    command = forced_dali_decode(*args)
    command[2] = command[2].replace("import sys, dali_decode, engine, train\n", """
import sys, dali_decode, engine, train
from nvidia.dali import Pipeline
def failing_build(self):
    raise RuntimeError("CUDA driver version is insufficient for CUDA runtime version")
Pipeline.build = failing_build
""")
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: NVIDIA DALI could not build its decoding pipeline")
    assert "decoded it with PIL" not in done.stdout + done.stderr and "Traceback" not in done.stderr
