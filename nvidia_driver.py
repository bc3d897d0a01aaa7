"""The machine's NVIDIA GPUs and driver, and the PyTorch build that runs on them.

A torch wheel brings its own CUDA libraries but needs a driver new enough for its CUDA major version: any
12.x build runs on driver 525.60.13 or newer, any 13.x build on 580 or newer (NVIDIA's "minor version
compatibility"). PyPI's torch 2.14 is the CUDA 13.0 build, so on an older driver torch sees no GPU, and a
script left to pick its device would train on the CPU. Hence:

- runtime.resolve_device asks gpus_torch_cannot_use before it picks: where the driver reports GPUs that torch
  cannot use, it stops with the fix, unless the CPU was asked for.
- setup_and_train.sh asks `python3 nvidia_driver.py build` which build to install (it prints the build's index
  on PyTorch's site; nothing where there is no NVIDIA driver), before any venv exists,
  and `VENV/bin/python nvidia_driver.py check` whether the installed torch uses every GPU.

Standard library only (torch only inside `check`), so the system python3 runs it.
"""

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

INDEX_URL = "https://download.pytorch.org/whl/"
# The oldest driver each CUDA major version runs on: NVIDIA's CUDA Compatibility guide, "Minor Version
# Compatibility", and the CUDA Toolkit release notes (12.x: 525.60.13; 13.x: 580).
MIN_DRIVER = {11: (450, 80, 2), 12: (525, 60, 13), 13: (580,)}


@dataclass(frozen=True)
class Build:
    tag: str  # PyTorch's index for it: INDEX_URL + tag
    cuda: str
    gpus: tuple[tuple[int, int], tuple[int, int] | None]  # compute capabilities it has kernels for, [from, below)

    @property
    def min_driver(self) -> tuple[int, ...]:
        return MIN_DRIVER[int(self.cuda.split(".")[0])]

    def runs_on(self, capability: tuple[int, int]) -> bool:
        oldest, below = self.gpus
        return oldest <= capability and (below is None or capability < below)


# PyTorch 2.14, the newest release requirements.txt admits, publishes cu126, cu130 and cu132; these two, in
# order of preference. cu130 is what a plain `pip install torch` gets, the build tested most; cu132 asks for the
# same 580 driver, so it would run on no machine cu130 does not. cu126, the last CUDA 12 build, runs on 525-579
# drivers and is the one with kernels for Maxwell, Pascal and Volta (V100), which CUDA 13 dropped; it has none
# for Blackwell. Every torch from 2.9 on has both, so a venv on an older admitted torch is served too.
BUILDS = (Build("cu130", "13.0", ((7, 5), None)), Build("cu126", "12.6", ((5, 0), (10, 0))))


@dataclass
class Gpus:
    driver: str
    count: int
    capabilities: list[tuple[int, int]]  # one per GPU; empty where the driver does not report them
    mig: bool  # MIG is on for one of them: CUDA then lists its instances, not the GPUs
    source: str  # what reported them, for the messages


def version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text))


def shown(driver_version: tuple[int, ...]) -> str:
    return ".".join(f"{part:02d}" if i == 2 else str(part) for i, part in enumerate(driver_version))


def query_nvidia_smi() -> list[list[str]] | None:
    """nvidia-smi's driver version, compute capability and MIG mode, one row per GPU; None where it is missing,
    hangs or fails (no driver loaded)."""
    for fields in ("driver_version,compute_cap,mig.mode.current", "driver_version"):  # older drivers lack the first
        try:
            answer = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if answer.returncode == 0:
            return [[field.strip() for field in line.split(",")] for line in answer.stdout.splitlines() if line.strip()]
    return None


def nvidia_gpus(kernel_version: Path = Path("/proc/driver/nvidia/version"), dev: Path = Path("/dev")) -> Gpus | None:
    """The GPUs the NVIDIA driver reports, or None where there is no NVIDIA driver. nvidia-smi's list; without a
    working nvidia-smi, the kernel module's version and the /dev/nvidiaN files, which are the GPUs a process here
    can open (a container given no GPU still sees the host's /proc/driver/nvidia, but not those files)."""
    rows = query_nvidia_smi()
    if rows:
        capabilities = [version(row[1])[:2] for row in rows if len(row) > 1 and re.fullmatch(r"\d+\.\d+", row[1])]
        return Gpus(rows[0][0], len(rows), capabilities if len(capabilities) == len(rows) else [],
                    any(len(row) > 2 and row[2] == "Enabled" for row in rows), "nvidia-smi")
    try:
        found = re.search(r"Kernel Module.*?\s(\d+\.\d+(?:\.\d+)?)\s", kernel_version.read_text())
    except OSError:
        return None
    files = [path for path in dev.glob("nvidia*") if re.fullmatch(r"nvidia\d+", path.name)]
    if not found or not files:
        return None
    return Gpus(found.group(1), len(files), [], False, f"the kernel driver ({kernel_version}, {dev}/nvidiaN)")


def gpus_wanted(gpus: Gpus, visible: str | None) -> int:
    """How many GPUs CUDA should show a process here: every one the driver lists, or as many as
    CUDA_VISIBLE_DEVICES names. CUDA reads that list up to its first entry that names no GPU, so an empty one
    (or -1) hides them all: that is a way to mean the CPU. With MIG on, CUDA lists one MIG instance."""
    count = gpus.count
    if visible is not None:
        named = 0
        for entry in (e.strip() for e in visible.split(",")):
            if not ((entry.isdigit() and int(entry) < gpus.count) or entry.startswith(("GPU-", "MIG-"))):
                break
            named += 1
        count = min(count, named)
    return min(count, 1) if gpus.mig else count


def choose_build(gpus: Gpus) -> Build | None:
    """The first of BUILDS that this driver runs and that has kernels for every GPU (any, where the driver
    does not report their compute capability)."""
    for build in BUILDS:
        if version(gpus.driver) >= build.min_driver and all(build.runs_on(c) for c in gpus.capabilities):
            return build
    return None


def describe(gpus: Gpus) -> str:
    capabilities = sorted(set(gpus.capabilities))
    kinds = f", compute capability {', '.join(f'{a}.{b}' for a, b in capabilities)}" if capabilities else ""
    return f"{gpus.count} NVIDIA GPU{'s' if gpus.count != 1 else ''} ({gpus.source}: driver {gpus.driver}{kinds})"


def no_build(gpus: Gpus) -> str:
    """Why no build in BUILDS runs here, and the driver that would run one."""
    fitting = [b for b in BUILDS if all(b.runs_on(c) for c in gpus.capabilities)]
    if not fitting:
        oldest = min(b.gpus[0] for b in BUILDS)
        return (f"no PyTorch build that requirements.txt admits has kernels for these GPUs (the oldest they "
                f"support is compute capability {oldest[0]}.{oldest[1]})")
    needed = min(b.min_driver for b in fitting)
    return (f"no PyTorch build that requirements.txt admits runs on driver {gpus.driver} with these GPUs: update "
            f"the driver to {shown(needed)} or newer (on Ubuntu: `sudo apt-get install nvidia-driver-580-server`, "
            f"or `sudo ubuntu-drivers install --gpgpu`; then reboot)")


def install_advice(gpus: Gpus, torch_version: str) -> str:
    build = choose_build(gpus)
    if build is None:
        return no_build(gpus)
    public = torch_version.split("+")[0]
    try:
        torchvision = f" torchvision=={metadata.version('torchvision').split('+')[0]}+{build.tag}"
    except metadata.PackageNotFoundError:
        torchvision = ""
    newer = f", or update the driver to {shown(BUILDS[0].min_driver)} or newer" if build != BUILDS[0] else ""
    return (f"install PyTorch's {build.tag} build (CUDA {build.cuda}), which runs here: `pip install "
            f"torch=={public}+{build.tag}{torchvision} --index-url {INDEX_URL}{build.tag}` "
            f"(./setup_and_train.sh picks and installs it by itself){newer}")


def gpus_torch_cannot_use(seen: int, torch_version: str, torch_cuda: str | None,
                          visible: str | None = None, gpus: Gpus | None = None) -> str | None:
    """None where torch sees every GPU it should (or the machine has none); else one paragraph: what the driver
    reports, what torch sees, why, and the fix. seen is torch.cuda.device_count(); torch_cuda torch.version.cuda;
    visible the CUDA_VISIBLE_DEVICES in force (None: unset)."""
    gpus = gpus or nvidia_gpus()
    if gpus is None:
        return None
    wanted = gpus_wanted(gpus, visible)
    if seen >= wanted:
        return None
    named = f", {wanted} of them named in CUDA_VISIBLE_DEVICES," if wanted < gpus.count and not gpus.mig else ""
    intro = (f"This machine has {describe(gpus)}{named} but PyTorch {torch_version} sees "
             f"{'none of them' if seen == 0 else f'only {seen}'}: ")
    if torch_cuda is None:
        cause = f"it is a build without CUDA. To use the GPUs, {install_advice(gpus, torch_version)}."
    elif version(gpus.driver) < MIN_DRIVER.get(version(torch_cuda)[0], (0,)):
        needed = shown(MIN_DRIVER[version(torch_cuda)[0]])
        cause = (f"it was built for CUDA {torch_cuda}, which needs driver {needed} or newer. To use the GPUs, "
                 f"{install_advice(gpus, torch_version)}.")
    else:
        cause = (f"it was built for CUDA {torch_cuda}, which this driver runs, so the cause is elsewhere: a GPU "
                 f"in an error state (look at `nvidia-smi` and `sudo dmesg | grep -i xid`; a reboot often clears "
                 f"it) or a driver that does not start (`python -c 'import torch; torch.cuda.init()'` prints CUDA's "
                 f"own error). To train on the GPUs torch does see, name them in CUDA_VISIBLE_DEVICES.")
    return (intro + cause + " To train on the CPU on purpose, pass --device cpu (or set CUDA_VISIBLE_DEVICES= "
            "empty).")


def check_torch() -> int:
    """In a venv: torch sees every GPU the driver lists and runs a kernel on each (a build without kernels for
    a GPU fails here, not an hour into setup). 0, or 2 with the paragraph on stderr."""
    import torch

    problem = gpus_torch_cannot_use(torch.cuda.device_count(), torch.__version__, torch.version.cuda,
                                    os.environ.get("CUDA_VISIBLE_DEVICES"))
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    count = torch.cuda.device_count()
    for index in range(count):
        try:
            torch.ones(64, device=f"cuda:{index}").square().sum().item()
        except RuntimeError as err:
            print(f"error: PyTorch {torch.__version__} (CUDA {torch.version.cuda}) sees GPU {index} "
                  f"({torch.cuda.get_device_name(index)}) but cannot run on it: {str(err).splitlines()[0]}",
                  file=sys.stderr)
            return 2
    print(f"PyTorch {torch.__version__} (CUDA {torch.version.cuda}) runs on {'all ' if count > 1 else ''}{count} "
          f"GPU{'s' if count != 1 else ''}" if count else f"PyTorch {torch.__version__} sees no GPU")
    return 0


def main(argv: list[str]) -> int:
    if argv == ["build"]:
        gpus = nvidia_gpus()
        if gpus is None:
            return 0  # no NVIDIA driver: PyPI's default build, as on any machine
        build = choose_build(gpus)
        if build is None:
            print(f"error: This machine has {describe(gpus)}, and {no_build(gpus)}. To train on the CPU on "
                  f"purpose, rerun with `-- --device cpu`.", file=sys.stderr)
            return 2
        why = "PyPI's own build" if build == BUILDS[0] else (
            f"the CUDA 13 builds need driver {shown(BUILDS[0].min_driver)} or newer"
            if version(gpus.driver) < BUILDS[0].min_driver else "the CUDA 13 builds have no kernels for these GPUs")
        print(f"{describe(gpus)}: PyTorch's {build.tag} build (CUDA {build.cuda}; {why})", file=sys.stderr)
        print(INDEX_URL + build.tag)
        return 0
    if argv == ["check"]:
        return check_torch()
    print("usage: nvidia_driver.py build | check", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
