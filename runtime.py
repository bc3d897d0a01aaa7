"""Where a process runs: its rank among the processes of a job, its device, its precision, and the one
logging helper through which only rank 0 speaks. Every script that trains or evaluates starts here.

`python train.py` is one process; torchrun starts one per GPU and sets RANK, WORLD_SIZE and friends in
the environment. Nothing here is module state: the Runtime is returned and passed on.
"""

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

from config import UsageError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


@dataclass
class Runtime:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")

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
