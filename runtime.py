"""Where a process runs: its rank among the processes of a job, its device, its precision, and the one
logging helper through which only rank 0 speaks. Every script that trains or evaluates starts here.

`python train.py` is one process; torchrun starts one per GPU and sets RANK, WORLD_SIZE and friends in
the environment. Nothing here is module state: the Runtime is returned and passed on.
"""

import os
import sys
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

from config import UsageError
from nvidia_driver import gpus_torch_cannot_use

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


@dataclass
class Runtime:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    store: dist.Store | None = None  # the job's rendezvous store, under torchrun

    @property
    def master(self) -> bool:
        """The process that logs and writes files."""
        return self.rank == 0


def is_master_process() -> bool:
    """Rank 0, or the only process. Read from the environment torchrun sets, so it holds before the process
    group exists and in every script alike."""
    return os.environ.get("RANK", "0") == "0"


def log(message: str) -> None:
    """Every human-readable line goes through here: rank 0 prints, without breaking a progress bar."""
    if is_master_process():
        tqdm.write(message, file=sys.stdout)
        sys.stdout.flush()


def resolve_device(requested: str) -> str:
    """auto: cuda where torch sees a GPU, else cpu. On a machine whose NVIDIA driver reports GPUs that torch
    does not see (a build for a newer driver, a build without CUDA, a GPU in an error state), auto and cuda
    refuse with the fix instead of training on the CPU unasked: --device cpu, or CUDA_VISIBLE_DEVICES= set
    empty, is how to mean the CPU."""
    if requested == "cpu":
        return requested
    problem = gpus_torch_cannot_use(torch.cuda.device_count(), torch.__version__, torch.version.cuda,
                                    os.environ.get("CUDA_VISIBLE_DEVICES"))
    if problem:
        raise UsageError(problem)
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was given but no CUDA GPU is visible (check nvidia-smi and the driver).")
    return requested


def native_bf16() -> bool:
    """Whether the current GPU computes in bf16 in hardware (compute capability 8.0 on: A100, A10G, L4, H100).
    torch.cuda.is_bf16_supported() on its own also answers True where bf16 is only emulated (V100, T4): there
    it has no tensor cores, while fp16 has them."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_precision(requested: str, device: torch.device) -> str:
    """auto: bf16 where the GPU has it in hardware, else fp16 (with loss scaling); fp32 on the CPU."""
    if device.type == "cpu":
        if requested == "fp16":
            log("--precision fp16 on the CPU: several times slower than fp32 there, and meant for testing the "
                "GPU's fp16 path (autocast and loss scaling).")
        return "fp32" if requested == "auto" else requested
    if requested == "bf16" and not native_bf16():
        raise UsageError(f"--precision bf16: this GPU ({torch.cuda.get_device_name(device)}, compute capability "
                         f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))}) has no bf16 hardware, "
                         f"so torch would emulate it in software, without tensor cores. Use --precision fp16 (what "
                         f"auto picks here: tensor cores, with loss scaling) or fp32.")
    return ("bf16" if native_bf16() else "fp16") if requested == "auto" else requested


def setup_distributed(device_type: str) -> Runtime:
    """This process's Runtime; under torchrun, also its process group (NCCL on GPUs, gloo on CPUs)."""
    if "RANK" not in os.environ:
        return Runtime(device=torch.device("cuda:0" if device_type == "cuda" else "cpu"))
    rt = Runtime(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]),
                 int(os.environ["LOCAL_WORLD_SIZE"]))
    # torchrun --max-restarts keeps one store for every attempt, and the process group's keys in it carry no
    # attempt number: restarted ranks would read the dead ones' addresses and fail to connect. Name the keys
    # by attempt.
    store, _, _ = next(dist.rendezvous("env://"))
    store = dist.PrefixStore(f"attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    rt.store = store
    if device_type == "cuda":
        rt.device = torch.device("cuda", rt.local_rank)
        torch.cuda.set_device(rt.device)
        dist.init_process_group("nccl", store=store, rank=rt.rank, world_size=rt.world_size, device_id=rt.device)
    else:
        dist.init_process_group("gloo", store=store, rank=rt.rank, world_size=rt.world_size)
    return rt


def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over the processes, in place; the tensor itself when there is one process."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


class JobFailed(Exception):
    """Raised on every process when one failed inside leave_together. cause is that failure on the one process
    that reports it (the lowest failed rank), None on the others, which leave silently with the same status."""

    def __init__(self, exit_status: int, cause: Exception | None):
        super().__init__(f"a process of this job failed (exit status {exit_status})")
        self.exit_status, self.cause = exit_status, cause


@contextmanager
def leave_together(rt: Runtime, exit_status: Callable[[Exception], int]):
    """For work that can fail on some processes only (rank 0's writes, a check of a process's own tensors) at a
    point every process passes. A process that left alone would leave the others waiting in their next
    collective, on NCCL until the watchdog's timeout, and since torch 2.6 itself waiting in
    destroy_process_group() for them. So one all-reduce after the work tells every process which ranks failed,
    and all of them raise JobFailed here, with the exit status of the lowest failed rank."""
    failure = None
    try:
        yield
    except JobFailed:
        raise  # a vote inside this one already took every process out
    except Exception as err:
        if rt.world_size == 1:
            raise
        failure = err
    if rt.world_size == 1:
        return
    statuses = torch.zeros(rt.world_size, device=rt.device)
    if failure is not None:
        statuses[rt.rank] = exit_status(failure)
    failed = all_reduce(statuses).nonzero().flatten().tolist()
    if failed:
        mark_failed(rt)  # before any process exits and torchrun sends the others SIGTERM (see train.StopRequest)
        reporter = failed[0]
        raise JobFailed(int(statuses[reporter]), failure if rt.rank == reporter else None) from failure


FAILED_KEY = "failed"


def mark_failed(rt: Runtime) -> bool:
    """Marks the job failed in the rendezvous store, which torchrun's agent holds, so the mark outlives this
    process. True when this process is the first to leave on an error, so the one that says why; the others
    leave quietly: their collectives broke because it left, or they failed alike. Where rank 0 held the store
    and is gone, rank 0 failed first."""
    if rt.world_size == 1:
        return True
    try:
        return rt.store.add(FAILED_KEY, 1) == 1
    except dist.DistError:
        return False


def another_failed(rt: Runtime) -> bool:
    """Whether a process of this job has left on an error (see mark_failed)."""
    if rt.world_size == 1:
        return False
    try:
        return rt.store.check([FAILED_KEY])
    except dist.DistError:
        return True


def launch_one_process_per_gpu(script: str, argv: list[str]) -> int:
    """`python train.py` on a multi-GPU box: become torchrun with one process per GPU. --standalone lets
    torch.distributed pick a free port, so two jobs on one box never collide."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(["--standalone", f"--nproc_per_node={torch.cuda.device_count()}", script, *argv])
    except SignalException as err:
        print(f"Launcher received signal {err.sigval}; the workers saved a checkpoint on their way out. "
              f"Rerun the same command to continue.")
    except ChildFailedError as err:
        print(f"A training process failed; see its error above. {err}", file=sys.stderr)
        return 1
    return 0
