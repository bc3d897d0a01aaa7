"""The loader workers' batches wait in /dev/shm: a start whose loaders would not fit there is refused with the fix,
where a worker would otherwise fail at its first batches (a Docker container's default is 64 MB)."""

import os
import subprocess
from types import SimpleNamespace

import pytest
from conftest import FAST, train_cmd

from config import UsageError, parse_args
from data import PREFETCH_BATCHES, SHARED_MEMORY, list_samples
from engine import build_data
from gpu_decode import EncodedImageFolderDataset
from runtime import Runtime

CLASSES = [f"digit_{i}" for i in range(10)]


@pytest.fixture
def shared_memory_free(monkeypatch):
    """/dev/shm reporting the given number of free bytes; every other folder as it is."""
    real_statvfs = os.statvfs

    def set_free(free: int) -> None:
        monkeypatch.setattr(os, "statvfs", lambda path: SimpleNamespace(f_bavail=free, f_frsize=1)
                            if os.fspath(path) == SHARED_MEMORY else real_statvfs(path))

    return set_free


def test_the_loaders_of_every_process_on_the_machine_must_fit_in_the_free_shared_memory(digits_dir,
                                                                                        shared_memory_free):
    """8 processes (GPUs) x 2 workers x PREFETCH_BATCHES batches of 32 val crops of 48 px, the larger loader's."""
    cfg, _ = parse_args(["--data-dir", str(digits_dir), *map(str, FAST), "--eval-image-size", "48"])
    rt = Runtime(rank=0, world_size=8, local_rank=0, local_world_size=8)
    needed = 8 * 2 * PREFETCH_BATCHES * 32 * 48 * 48 * 3
    shared_memory_free(needed)
    assert build_data(cfg, CLASSES, rt, workers=2).val_loader.prefetch_factor == PREFETCH_BATCHES == 2
    shared_memory_free(needed - 1)
    with pytest.raises(UsageError) as refused:
        build_data(cfg, CLASSES, rt, workers=2)
    message = str(refused.value)
    assert f"keep {needed / 1e6:.1f} MB of batches in shared memory (/dev/shm): 8 processes x 2 workers x 2 " \
           f"batches x 0.2 MB (32 images of 6.9 KB), but /dev/shm has {(needed - 1) / 1e6:.1f} MB free" in message
    assert "`docker run --ipc=host ...`" in message and "`--shm-size=2g`" in message and "--workers (1 fit)" in message
    # Loading in the training process (--workers 0) uses no shared memory.
    shared_memory_free(0)
    assert build_data(cfg, CLASSES, rt, workers=0).train_loader.num_workers == 0


def test_the_device_decode_routes_count_the_jpeg_files_their_workers_send(digits_dir):
    paths, _ = list_samples(digits_dir / "train", CLASSES)
    mean_file_bytes = sum(os.stat(p).st_size for p in paths) / len(paths)
    files = EncodedImageFolderDataset(digits_dir / "train", CLASSES, True, 32, 0, device_share=1.0)
    assert files.shared_bytes_per_image() == pytest.approx(mean_file_bytes, rel=0.1)
    assert mean_file_bytes < 3 * 32 * 32 / 2  # far from the crops: a count of crops would not pass
    half = EncodedImageFolderDataset(digits_dir / "train", CLASSES, True, 32, 0, device_share=0.5)
    assert half.shared_bytes_per_image() == pytest.approx((files.shared_bytes_per_image() + 3 * 32 * 32) / 2, abs=1)


def train_in_shared_memory_of(size: str, *args) -> subprocess.CompletedProcess:
    """train.py in a mount namespace of its own whose /dev/shm is a tmpfs of this size, as in a container."""
    command = ["unshare", "--mount", "--map-root-user", "sh", "-c",
               f'mount -t tmpfs -o size={size} tmpfs /dev/shm && exec "$@"', "sh", *train_cmd(*args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_docker_default_shared_memory_refuses_imagenet_batches_and_trains_the_demo(digits_dir, tmp_path):
    args = ["--data-dir", digits_dir, *FAST, "--epochs", 1]
    refused = train_in_shared_memory_of("64m", *args, "--output-dir", tmp_path / "imagenet-sized", "--image-size", 224,
                                        "--batch-size", 256)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "Traceback" not in refused.stderr and "epoch 1" not in refused.stdout
    assert ("error: The data loaders would keep 77.1 MB of batches in shared memory (/dev/shm): 1 process x 1 "
            "worker x 2 batches x 38.5 MB (256 images of 150.5 KB), but /dev/shm has 67.1 MB free:") in refused.stderr
    assert "--shm-size=2g" in refused.stderr
    demo = train_in_shared_memory_of("64m", *args, "--output-dir", tmp_path / "demo")
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "Training finished: 1 epochs" in demo.stdout
