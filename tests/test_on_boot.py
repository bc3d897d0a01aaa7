"""setup_and_train.sh --on-boot: the systemd service that resumes a run after a reboot or a spot stop and start,
and the boot-time command it runs. The box is test_setup_and_train's fake instance (stubbed disk tools, tmux and
systemctl); one test runs the real train.py through the boot command."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FAST
from test_setup_and_train import ROOT, Box, write_stub

UNIT = "train-resnet50.service"


class BootBox(Box):
    """A box where systemd runs (SYSTEMD_RUN_DIR exists), with a logging systemctl and a mountpoint stub that
    answers for the data volume from a flag file."""

    def __init__(self, tmp: Path):
        super().__init__(tmp)
        self.units = tmp / "units"
        self.units.mkdir()
        (tmp / "run-systemd").mkdir()
        write_stub(self.bin / "systemctl", "")
        write_stub(self.bin / "mountpoint", '[ -f "$STUB_DIR/volume_mounted" ]')
        self.env.update(SYSTEMD_RUN_DIR=str(tmp / "run-systemd"), UNIT_DIR=str(self.units), BOOT_WAIT_SECONDS="20")
        self.volume(mounted=True)

    def volume(self, mounted: bool):
        flag = self.stubs / "volume_mounted"
        flag.touch() if mounted else flag.unlink(missing_ok=True)

    def boot_script(self) -> Path:
        return self.units / "train-resnet50.boot.sh"

    def boot(self, check=True, **kwargs) -> subprocess.CompletedProcess:
        """What the service runs at boot; tmux's sessions did not survive the reboot."""
        (self.stubs / "tmux_running").unlink(missing_ok=True)
        proc = subprocess.run(["bash", str(self.boot_script())], env=self.env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=60, **kwargs)
        if check:
            assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc

    def logs(self, out: Path) -> list[Path]:
        return sorted((out / "logs").glob("train-*.log"))


@pytest.fixture
def box(tmp_path):
    box = BootBox(tmp_path)
    yield box
    box.release()


def test_on_boot_installs_a_valid_unit_that_reruns_the_same_run(box):
    proc = box.run("--on-boot", "--batch-size", "64", "--", "--lr", "0.1 0.2")
    assert box.calls("systemctl") == ["systemctl daemon-reload", f"systemctl enable {UNIT}"]
    assert f"installed {UNIT}" in proc.stdout and "--no-on-boot" in proc.stdout
    unit = (box.units / UNIT).read_text()
    assert f"ExecStart=/bin/bash {box.boot_script()}" in unit and "Type=oneshot" in unit and "Restart=" not in unit
    assert f"User={subprocess.run(['id', '-un'], capture_output=True, text=True).stdout.strip()}" in unit

    analyze = shutil.which("systemd-analyze")
    if analyze:  # Debian's systemd package; it reports a bad line with "ignoring" and still exits 0
        verify = subprocess.run([analyze, "verify", "--man=no", str(box.units / UNIT)], capture_output=True,
                                text=True, timeout=60)
        assert verify.returncode == 0, verify.stderr
        assert not [line for line in verify.stderr.splitlines() if str(box.units / UNIT) in line], verify.stderr

    # The boot command starts the same train.py command line, with the same words, in the same session.
    box.boot()
    calls = box.calls("python train.py")
    assert len(calls) == 2 and calls[0] == calls[1]
    assert calls[1] == f"python train.py --output-dir {box.mnt}/runs/resnet50 --batch-size 64 --lr 0.1 0.2"
    assert box.calls("tmux new-session")[-1].startswith("tmux new-session -d -s resnet50 ")


def test_on_boot_is_refused_where_systemd_does_not_run_before_anything_starts(box):
    shutil.rmtree(box.tmp / "run-systemd")
    proc = box.run("--on-boot", check=False)
    assert proc.returncode == 1 and "systemd is not running on this machine" in proc.stderr
    assert not box.calls("tmux") and not box.calls("mount") and not list(box.units.iterdir())


def test_no_on_boot_removes_the_service(box):
    box.run("--on-boot")
    proc = box.run("--no-on-boot")
    assert not (box.units / UNIT).exists() and not box.boot_script().exists()
    assert f"systemctl disable {UNIT}" in box.calls("systemctl") and "removed" in proc.stdout
    assert "nothing to remove" in box.run("--no-on-boot").stdout


def write_last_log(box, out: Path, text: str):
    log = box.logs(out)[-1]
    log.write_text(text)
    return log


@pytest.mark.parametrize("last_log, reason", [
    ("error: --lr must be positive\ntrain.py exited with status 2\n", "refused (exit status 2"),
    ("error: The training loss became non-finite\ntrain.py exited with status 3\n", "non-finite (exit status 3)"),
    ("Training finished: 50 epochs, final val top-1 76.10%.\ntrain.py exited with status 0\n", "it has finished"),
])
def test_a_run_that_must_not_restart_is_left_alone_and_the_log_says_why(box, last_log, reason):
    box.run("--on-boot")
    out = box.mnt / "runs/resnet50"
    log = write_last_log(box, out, last_log)
    proc = box.boot()
    assert len(box.calls("tmux new-session")) == 1 and len(box.logs(out)) == 1
    assert "not restarting" in proc.stdout and reason in proc.stdout  # the journal
    assert log.read_text().startswith(last_log) and reason in log.read_text().splitlines()[-1]


def test_a_killed_run_is_resumed_once_with_the_volume_already_mounted(box):
    box.run("--on-boot")
    out = box.mnt / "runs/resnet50"
    write_last_log(box, out, "epoch 3/50 ...\ntrain.py exited with status 137\n")
    box.train_py_will("Resuming ...\nTraining resnet50 on 8 x cuda\n", hold=True)
    proc = box.boot()
    assert "waiting" not in proc.stdout and "passed its start-up checks" in proc.stdout
    assert len(box.calls("tmux new-session")) == 2
    # The service runs once per boot; a second start while the run is up starts nothing.
    (box.stubs / "tmux_running").touch()
    proc = subprocess.run(["bash", str(box.boot_script())], env=box.env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "already running" in proc.stdout
    assert len(box.calls("tmux new-session")) == 2


def test_a_volume_that_never_appears_fails_the_boot_clearly(box):
    box.run("--on-boot")
    box.volume(mounted=False)
    box.env["BOOT_WAIT_SECONDS"] = "1"
    proc = box.boot(check=False)
    assert proc.returncode == 1 and f"{box.mnt} was not mounted within 1 s" in proc.stderr
    assert len(box.calls("tmux new-session")) == 1


def real_code(box):
    """The repository's own code in the box's checkout, and a venv whose python is this one."""
    for path in ROOT.glob("*.py"):
        shutil.copy(path, box.code / path.name)
    venv = box.tmp / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin/python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    (venv / "bin/python").chmod(0o755)
    sha = subprocess.run(["sha256sum", box.code / "requirements.txt"], capture_output=True, text=True, check=True)
    (venv / ".requirements.sha256").write_text(sha.stdout.split()[0] + "\n")
    box.env["VENV"] = str(venv)


def metrics_rows(out: Path) -> list[dict]:
    if not (out / "metrics.csv").exists():
        return []
    with open(out / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def wait_for(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def train_py_pids(out: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if proc.name.isdigit() and b"train.py" in cmdline and str(out).encode() in cmdline:
            pids.append(int(proc.name))
    return pids


@pytest.mark.slow
def test_a_real_run_killed_mid_way_resumes_at_boot_once_the_volume_appears_and_then_is_left_alone(box, digits_dir):
    real_code(box)
    box.env["DATASET_PATH"] = str(digits_dir)
    out = box.mnt / "runs/digits"
    try:
        box.run("--on-boot", "--output-dir", out, "--", *FAST, "--epochs", "2")
        wait_for(lambda: len(metrics_rows(out)) >= 1, 120, "the first epoch")
        for pid in train_py_pids(out):  # the power goes out
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: "exited with status 137" in box.logs(out)[-1].read_text(), 30, "the kill")

        (box.stubs / "tmux_running").unlink()  # the reboot
        box.volume(mounted=False)  # it appears a moment after the service starts
        booting = subprocess.Popen(["bash", str(box.boot_script())], env=box.env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        time.sleep(2)
        box.volume(mounted=True)
        output, _ = booting.communicate(timeout=120)
        assert booting.returncode == 0, output
        assert "waiting up to 20 s for the data volume" in output and "passed its start-up checks" in output
        wait_for(lambda: "exited with status" in box.logs(out)[-1].read_text(), 180, "the resumed run to end")
    finally:
        for pid in train_py_pids(out):
            os.kill(pid, signal.SIGKILL)
    first, resumed = box.logs(out)
    assert "exited with status 0" in resumed.read_text() and resumed.read_text().count("Resuming") == 1
    assert [int(r["epoch"]) for r in metrics_rows(out)] == [1, 2]

    # The next boot finds the run finished: nothing starts, and the journal and the log say why.
    proc = box.boot()
    assert "not restarting" in proc.stdout and "it has finished" in proc.stdout
    assert len(box.logs(out)) == 2 and len(box.calls("tmux new-session")) == 2
