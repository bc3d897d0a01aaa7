"""Where a run lives by default: on the data's volume when that is a mount other than the root filesystem."""

import os
import subprocess
from pathlib import Path

import pytest

import dataset_paths
from dataset_paths import default_output_dir


@pytest.fixture
def mounts(monkeypatch):
    """os.path.ismount answering from a set of folders; "/" is always one, as on any machine."""
    mounted = set()
    monkeypatch.setattr(os.path, "ismount", lambda p: os.fspath(p) in mounted | {"/"})
    return mounted


def test_data_on_a_mounted_volume_puts_the_run_on_that_volume(tmp_path, mounts):
    volume = tmp_path / "imagenet"
    (volume / "extracted").mkdir(parents=True)
    mounts.add(str(volume))
    code = tmp_path / "code"
    assert default_output_dir(volume / "extracted", code) == volume / "runs" / "resnet50"
    assert default_output_dir(volume, code) == volume / "runs" / "resnet50"  # the data root is the mount itself
    # The nearest mount counts, and a path that does not exist yet is resolved all the same.
    mounts.add(str(volume / "extracted"))
    assert default_output_dir(volume / "extracted" / "not-yet", code) == volume / "extracted" / "runs" / "resnet50"


def test_data_on_the_root_filesystem_keeps_the_run_beside_the_code(tmp_path, mounts):
    (tmp_path / "data").mkdir()
    assert default_output_dir(tmp_path / "data", tmp_path / "code") == tmp_path / "code" / "runs" / "resnet50"
    assert default_output_dir("/mnt/imagenet/extracted", tmp_path / "code") == tmp_path / "code" / "runs" / "resnet50"


def test_a_symlink_into_a_volume_follows_the_link(tmp_path, mounts):
    volume = tmp_path / "vol"
    (volume / "imagenet").mkdir(parents=True)
    mounts.add(str(volume))
    (tmp_path / "link").symlink_to(volume / "imagenet")
    assert default_output_dir(tmp_path / "link", tmp_path / "code") == volume / "runs" / "resnet50"


def test_a_read_only_volume_keeps_the_run_beside_the_code(tmp_path, mounts, monkeypatch):
    volume = tmp_path / "nfs"
    volume.mkdir()
    mounts.add(str(volume))
    monkeypatch.setattr(os, "access", lambda p, mode: not (os.fspath(p) == str(volume) and mode == os.W_OK))
    assert default_output_dir(volume, tmp_path / "code") == tmp_path / "code" / "runs" / "resnet50"


def test_a_volume_in_memory_keeps_the_run_beside_the_code(tmp_path, mounts, monkeypatch):
    shm = tmp_path / "shm"
    shm.mkdir()
    mounts.add(str(shm))
    monkeypatch.setattr(dataset_paths, "filesystem_type", lambda p: "tmpfs" if p == shm else None)
    assert default_output_dir(shm / "imagenet", tmp_path / "code") == tmp_path / "code" / "runs" / "resnet50"


def test_the_filesystem_type_comes_from_the_mount_table(tmp_path):
    if not os.path.exists("/proc/self/mounts"):
        pytest.skip("no /proc/self/mounts (not Linux)")
    assert dataset_paths.filesystem_type(Path("/proc")) == "proc"
    assert dataset_paths.filesystem_type(Path("/no/such/mount")) is None
    # A tmpfs whose device is named like a volume, then a ramfs mounted over it: the type of the one on top.
    target = tmp_path / "volume"
    target.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "data-volume", str(target)], capture_output=True,
                          text=True)
    if done.returncode:
        pytest.skip(f"cannot mount here: {done.stderr.strip()}")
    try:
        assert dataset_paths.filesystem_type(target) == "tmpfs"
        subprocess.run(["mount", "-t", "ramfs", "ramfs", str(target)], check=True)
        try:
            assert dataset_paths.filesystem_type(target) == "ramfs"
        finally:
            subprocess.run(["umount", str(target)], check=True)
    finally:
        subprocess.run(["umount", "-l", str(target)], check=True)


@pytest.mark.parametrize("name", ["checkpoint.pth", "checkpoint_prev.pth"])
def test_a_run_already_beside_the_code_stays_there_until_one_lives_on_the_volume(tmp_path, mounts, name):
    volume, code = tmp_path / "vol", tmp_path / "code"
    volume.mkdir()
    mounts.add(str(volume))
    (code / "runs" / "resnet50").mkdir(parents=True)
    (code / "runs" / "resnet50" / name).write_bytes(b"x")
    assert default_output_dir(volume, code) == code / "runs" / "resnet50"
    (volume / "runs" / "resnet50").mkdir(parents=True)
    (volume / "runs" / "resnet50" / "checkpoint.pth").write_bytes(b"x")
    assert default_output_dir(volume, code) == volume / "runs" / "resnet50"


def test_the_constant_train_py_imports_is_the_rule_for_the_default_data_root():
    assert dataset_paths.DEFAULT_OUTPUT_DIR == default_output_dir(dataset_paths.DEFAULT_DATA_DIR)


def test_a_data_dir_given_alone_puts_the_run_on_its_volume_and_the_start_says_where(tmp_path, mounts):
    from config import parse_config
    from outputs import where_the_run_lives

    volume = tmp_path / "vol"
    (volume / "other" / "extracted").mkdir(parents=True)
    mounts.add(str(volume))
    cfg = parse_config(["--data-dir", str(volume / "other" / "extracted")])
    assert cfg.output_dir == str(volume / "runs" / "resnet50")
    assert parse_config(["--data-dir", str(volume), "--output-dir", "/x"]).output_dir == "/x"
    assert f"on the volume mounted at {volume}, which outlives" in where_the_run_lives(Path(cfg.output_dir))
    assert "a spot termination deletes it" in where_the_run_lives(tmp_path / "elsewhere")


def test_a_file_given_as_the_data_folder_is_named_as_a_file(tmp_path):
    archive = tmp_path / "ILSVRC2012_img_train.tar"
    archive.write_bytes(b"")
    with pytest.raises(dataset_paths.DatasetLayoutError, match="is a file, not a folder"):
        dataset_paths.check_layout(archive)
