"""setup_and_train.sh's disk steps on a real block device: a loop device over a file, with the real lsblk, blkid,
mkfs.ext4, mount and umount, a temporary mount point and a temporary fstab. Needs root and loop devices; skipped,
saying which is missing, elsewhere. Everything past the disk (git, the venv, tmux) is test_setup_and_train's stubs.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from test_setup_and_train import Box

DISK_TOOLS = ["lsblk", "blkid", "mkfs.ext4", "mount", "umount"]


def loop_device_or_skip(image) -> str:
    if os.geteuid() != 0:
        pytest.skip("loop devices need root")
    missing = [tool for tool in ["losetup", *DISK_TOOLS] if not shutil.which(tool)]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    attach = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True, text=True)
    if attach.returncode:
        pytest.skip(f"no loop device here: {attach.stderr.strip()}")
    return attach.stdout.strip()


@pytest.fixture
def loop_box(tmp_path):
    """A box whose disk tools are the real ones, and a 64 MiB loop device that starts all zeros."""
    box = Box(tmp_path)
    for tool in DISK_TOOLS:
        (box.bin / tool).unlink(missing_ok=True)
        (box.bin / tool).symlink_to(shutil.which(tool))
    box.env["DEV_DIR"] = "/dev"
    device = loop_device_or_skip(tmp_path / "disk.img")
    box.device = device
    try:
        yield box
    finally:
        subprocess.run(["umount", str(box.mnt)], capture_output=True)
        subprocess.run(["losetup", "-d", device], capture_output=True)


def mounted_source(path) -> str:
    return subprocess.run(["findmnt", "-n", "-o", "SOURCE", str(path)], capture_output=True, text=True).stdout.strip()


def fstab_entries(box) -> list[str]:
    return [line for line in box.fstab.read_text().splitlines() if str(box.mnt) in line]


def filesystem_uuid(device) -> str:
    return subprocess.run(["blkid", "-p", "-s", "UUID", "-o", "value", device], capture_output=True,
                          text=True).stdout.strip()


def run_disk_steps(box, *args, check=True):
    return box.run("--device", box.device, "--output-dir", box.tmp / "run", *args, check=check)


def test_an_empty_disk_is_formatted_mounted_by_uuid_and_a_second_run_changes_nothing(loop_box):
    box = loop_box
    refused = run_disk_steps(box, check=False)
    assert refused.returncode != 0 and "rerun with --format-empty-disk" in refused.stderr
    assert filesystem_uuid(box.device) == "" and not box.calls("tmux")

    run_disk_steps(box, "--format-empty-disk")
    uuid = filesystem_uuid(box.device)
    assert uuid and mounted_source(box.mnt) == box.device
    assert fstab_entries(box) == [f"UUID={uuid} {box.mnt} ext4 defaults,nofail 0 2"]
    (box.mnt / "extracted").mkdir()
    (box.mnt / "extracted/kept.txt").write_text("data")

    # Rerun while mounted, then after an unmount (a reboot without the fstab mount): the same filesystem, the
    # same single fstab line, the files still there.
    again = run_disk_steps(box, "--format-empty-disk")
    assert "already mounted" in again.stdout
    subprocess.run(["umount", str(box.mnt)], check=True)
    remount = run_disk_steps(box, "--format-empty-disk")
    assert "not formatting it" in remount.stdout and mounted_source(box.mnt) == box.device
    assert filesystem_uuid(box.device) == uuid
    assert fstab_entries(box) == [f"UUID={uuid} {box.mnt} ext4 defaults,nofail 0 2"]
    assert (box.mnt / "extracted/kept.txt").read_text() == "data"


def test_a_disk_with_a_filesystem_and_files_is_never_formatted(loop_box):
    box = loop_box
    subprocess.run(["mkfs.ext4", "-q", box.device], check=True)
    uuid = filesystem_uuid(box.device)
    elsewhere = box.tmp / "elsewhere"
    elsewhere.mkdir()
    subprocess.run(["mount", box.device, str(elsewhere)], check=True)
    (elsewhere / "imagenet.tar").write_text("precious")
    subprocess.run(["umount", str(elsewhere)], check=True)

    proc = run_disk_steps(box, "--format-empty-disk")
    assert "already has a ext4 filesystem: not formatting it" in proc.stdout
    assert filesystem_uuid(box.device) == uuid and (box.mnt / "imagenet.tar").read_text() == "precious"


def test_a_disk_with_data_but_no_filesystem_is_left_untouched(loop_box):
    box = loop_box
    payload = os.urandom(4096)
    with open(box.device, "r+b") as disk:
        disk.seek(512 * 1024)
        disk.write(payload)
    proc = run_disk_steps(box, "--format-empty-disk", check=False)
    assert proc.returncode != 0 and "holds data but no filesystem" in proc.stderr
    assert mounted_source(box.mnt) == "" and fstab_entries(box) == []
    with open(box.device, "rb") as disk:
        disk.seek(512 * 1024)
        assert disk.read(4096) == payload
