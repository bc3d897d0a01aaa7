"""Train ResNet-50 on ImageNet-1K (or any ImageNet-style folder) with DDP, mixed precision, OneCycleLR and
exact, automatic resume.

    python train.py                       # every visible GPU; continues from --output-dir if it holds a run
    python train.py --demo                # bundled handwritten digits, runs on a CPU in about a minute
    torchrun --nproc_per_node=8 train.py  # the same through torchrun; several boxes: torchrun --nnodes=...

Rerunning the same command after a kill, a reboot or a spot interruption continues where the last
checkpoint left off, mid-epoch included, with no batch repeated or skipped (see data.py for why that holds).

Read it top to bottom: signals, the run's state and its checkpoint, the epoch loop, main. The settings are
in config.py, the process's rank and device in runtime.py, the model, the step and the data in engine.py,
metrics.csv and the plot in outputs.py.
"""

import gc
import json
import math
import os
import signal
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import engine
import outputs
from checkpoint import (
    CheckpointError,
    load_latest_checkpoint,
    read_checkpoint,
    remove_stale_temporaries,
    save_checkpoint,
)
from config import EXIT_BAD_INPUT, EXIT_NON_FINITE, Config, UsageError, parse_args, resumed_config
from data import DataVanishedError, FailingVolumeError, make_demo_dataset
from dataset_paths import DEMO_DATA_DIR, DatasetLayoutError, check_layout
from gpu_decode import model_batch
from recipes import WeightAverage, learning_rate, peak_lr
from runtime import (
    JobFailed,
    Runtime,
    all_reduce,
    another_failed,
    is_master_process,
    launch_one_process_per_gpu,
    leave_together,
    log,
    mark_failed,
    resolve_device,
    setup_distributed,
)

# A CPU run on more training images than this says what an epoch will take before it starts: on ImageNet the
# progress bar's estimate shows only once a slow first stretch of the epoch is under way.
CPU_FORECAST_ABOVE_IMAGES = 100_000

# ---------------------------------------------------------------------------------------------------- signals


class StopRequest:
    """SIGTERM (spot interruption notice, `kill`), SIGHUP (the SSH connection of a run started without tmux
    dropped) or Ctrl-C: finish the step, save, exit 0. A second Ctrl-C quits at once without saving."""

    def __init__(self, rt: Runtime):
        self.rt, self.signal_name = rt, None
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self.handle)

    def handle(self, signum, frame):
        if self.signal_name and signum == signal.SIGINT:
            # Die of the signal itself: a KeyboardInterrupt would unwind past the data loader, whose workers are
            # only stopped at exit, with the SIGTERM that buys them WORKER_GRACE_SECONDS.
            sys.stdout.flush()
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        if signum == signal.SIGTERM and another_failed(self.rt):
            # torchrun stopping the job because another process failed: that one said why, and no save can
            # come, as the next collective would wait for the process that is gone. Die of the signal, as
            # without this handler: an exception raised here could land in any cleanup code.
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        self.signal_name = signal.Signals(signum).name
        if signum == signal.SIGHUP:
            # Writing to a terminal that is gone fails, and the save must not die of a progress bar. Output
            # that goes to a file (nohup, tee) still reaches it.
            for stream in (sys.stdout, sys.stderr):
                if stream.isatty():
                    os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
            log("SIGHUP received: the terminal went away. Saving a checkpoint after this step, then stopping; "
                "rerun the same command (in tmux, or through setup_and_train.sh) to continue.")
            return
        log(f"{self.signal_name} received: saving a checkpoint after this step (Ctrl-C again quits without saving).")

    def disarm(self):
        """The run is over, finished or failed: nothing is left to save. A SIGTERM now (torchrun stopping the
        others after one process failed) must not announce a save that never comes, nor cut the exit short."""
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.default_int_handler)


class NonFiniteLoss(Exception):
    pass


# ---------------------------------------------------------------------------------------------------- the run

@dataclass
class Run:
    """Everything one training run holds, and where it is. Only epoch, samples_done, history and the carried
    sums change as it trains; the checkpoint stores them."""
    cfg: Config
    classes: list[str]
    rt: Runtime
    training: engine.Training
    data: engine.Data
    stop: StopRequest
    epoch: int = 0
    samples_done: int = 0  # images of this epoch consumed, counted over all ranks
    history: list[dict] = field(default_factory=list)  # one metrics.csv row per finished epoch
    # The unfinished epoch's train-metric sums from before a mid-epoch resume (loss, top-1, top-5, images,
    # skipped images) and the training seconds it took so far.
    carried: torch.Tensor = field(default_factory=lambda: torch.zeros(5, dtype=torch.float64))
    carried_seconds: float = 0.0
    # The unfinished epoch's steps that compiled a graph (--compile: the first at each input shape in this
    # process), across resumes: their seconds, within the epoch's, and their images. Speeds and the time to go
    # leave them out; metrics.csv reports the seconds as compile_seconds.
    compile_seconds: float = 0.0
    compile_images: int = 0
    compiled_shapes: set[torch.Size] = field(default_factory=set)
    board: outputs.TrainingBoard | None = None  # live curves, written by rank 0
    sync_check: "SyncCheck | None" = None  # --sync-check-steps
    pruned: dict | None = None  # prune.py's record when the network is a pruned one: every checkpoint carries it on

    @property
    def out(self) -> Path:
        return Path(self.cfg.output_dir)

    def global_step(self) -> int:
        return self.epoch * self.data.sampler.steps_per_epoch() + self.samples_done // self.data.sampler.global_batch

    def peak_lr(self) -> float:
        return peak_lr(self.cfg.lr, self.cfg.lr_reference_batch, self.data.sampler.global_batch, self.cfg.lr_scaling)

    def lr_at(self, step: int) -> float:
        c, steps_per_epoch = self.cfg, self.data.sampler.steps_per_epoch()
        return learning_rate(c.schedule, step, c.epochs * steps_per_epoch, round(c.warmup_epochs * steps_per_epoch),
                             self.peak_lr(), c.pct_start, c.div_factor, c.final_div_factor)

    def images_seen(self) -> int:
        """TensorBoard's x axis: the same at any batch size or number of processes."""
        return self.epoch * len(self.data.train_set) + self.samples_done

    def seconds_spent(self) -> float:
        """Training plus validation time of the finished epochs."""
        return sum(r["epoch_seconds"] + r.get("val_seconds", 0.0) for r in self.history)


def checkpoint_state(run: Run, epoch_sums: torch.Tensor, seconds: float) -> dict:
    t = run.training
    return {
        "model": t.raw_model.state_dict(),  # the bare module: no "module." or "_orig_mod." prefixes
        "optimizer": t.optimizer.state_dict(),
        "ema": t.ema.model.state_dict() if t.ema else None,
        "grad_scaler": t.scaler.state_dict(),
        "epoch": run.epoch,
        "samples_done": run.samples_done,
        "epoch_sums": epoch_sums.tolist(),
        "epoch_seconds": seconds,
        "epoch_compile_seconds": run.compile_seconds,
        "epoch_compile_images": run.compile_images,
        "history": run.history,
        "config": asdict(run.cfg),
        "class_names": run.classes,
        "world_size": run.rt.world_size,
        "torch_version": str(torch.__version__),  # TorchVersion would not load with weights_only
        # Present for a channel-pruned network: loaders then take the layer widths from the weights' shapes.
        **({"pruned": run.pruned} if run.pruned is not None else {}),
    }


def check_weights_finite(run: Run) -> None:
    """A step can turn the weights non-finite after a finite loss; such weights must never become the last good
    checkpoint. Every rank checks (DDP keeps them identical), so all stop together."""
    t = run.training
    tensors = [v for m in [t.raw_model] + ([t.ema.model] if t.ema else []) for v in m.state_dict().values()
               if v.is_floating_point()]
    if not torch.stack([v.isfinite().all() for v in tensors]).all():
        raise NonFiniteLoss(f"The weights became non-finite in epoch {run.epoch + 1} at step {run.global_step()}, "
                            f"so they were not saved. The last good checkpoint in {run.out} is untouched. Try a "
                            f"lower --lr, or --precision bf16/fp32 instead of fp16.")


def save(run: Run, epoch_sums: torch.Tensor, seconds: float) -> None:
    with leave_together(run.rt, exit_status):
        check_weights_finite(run)
        if run.rt.master:
            write_checkpoint(run, epoch_sums, seconds)


def write_checkpoint(run: Run, epoch_sums: torch.Tensor, seconds: float) -> None:
    try:
        save_checkpoint(checkpoint_state(run, epoch_sums, seconds), run.out)
    except OSError as err:
        if not run.out.is_dir():
            raise UsageError(f"The output folder {run.out} disappeared during training (moved, deleted or "
                             f"unmounted), so nothing more was written. Put it back and rerun the same command to "
                             f"continue from its last checkpoint.") from err
        raise UsageError(f"Could not save a checkpoint in {run.out}: {err}. The previous checkpoints there are "
                         f"intact; free some space or fix the folder's permissions, then rerun the same command "
                         f"to continue from them.") from err


def resume(run: Run, state: dict) -> None:
    cfg, t = run.cfg, run.training
    saved = state["config"]
    if state["class_names"] != run.classes:
        raise UsageError(f"The checkpoint in {run.out} was trained on {len(state['class_names'])} other classes "
                         f"than the {len(run.classes)} in {cfg.data_dir}. Use another --output-dir for this "
                         f"dataset, or --no-resume to start over here.")
    if saved["arch"] != cfg.arch:
        raise UsageError(f"The checkpoint in {run.out} is a {saved['arch']}, not a {cfg.arch}. Pass --arch "
                         f"{saved['arch']} to continue it, or --no-resume to start over.")
    t.raw_model.load_state_dict(state["model"])
    t.optimizer.load_state_dict(state["optimizer"])
    if state["grad_scaler"]:  # a bf16 or fp32 run saves its disabled scaler as {}: an fp16 resume starts afresh
        t.scaler.load_state_dict(state["grad_scaler"])
    run.epoch, run.samples_done, run.history = state["epoch"], state["samples_done"], state["history"]
    run.carried = torch.tensor(state["epoch_sums"], dtype=torch.float64)
    run.carried_seconds = state["epoch_seconds"]
    run.compile_seconds = state.get("epoch_compile_seconds", 0.0)
    run.compile_images = state.get("epoch_compile_images", 0)
    # The command line wins over the saved hyperparameters (config.resumed_config refused another optimizer).
    fresh = engine.build_optimizer(t.raw_model, cfg).param_groups
    for group, new in zip(t.optimizer.param_groups, fresh, strict=True):
        group.update({k: new[k] for k in ("momentum", "betas", "weight_decay") if k in new})
    if t.ema and state.get("ema"):
        t.ema.model.load_state_dict(state["ema"])
    if run.epoch >= cfg.epochs:
        return  # finished; main says so
    log(f"Resuming {run.out}: epoch {run.epoch + 1}, {run.samples_done:,}/{len(run.data.train_set):,} images of "
        f"it done.")
    # A setting newer than the checkpoint was at its default in that run (an old checkpoint is an SGD run).
    saved = {**asdict(Config()), **saved}
    changed = {k: (saved.get(k), v) for k, v in asdict(cfg).items()
               if k not in ("no_resume", "demo") and saved.get(k) != v}
    if state["world_size"] != run.rt.world_size:
        changed["processes"] = (state["world_size"], run.rt.world_size)
    for key, (old, new) in changed.items():
        log(f"  {key}: {old} -> {new}; the new value applies from here on.")
    if changed.keys() & {"epochs", "lr", "lr_reference_batch", "lr_scaling", "schedule", "pct_start", "warmup_epochs",
                         "div_factor", "final_div_factor", "batch_size", "processes"}:
        log(f"  The LR schedule is recomputed for {cfg.epochs} epochs; the LR now is "
            f"{run.lr_at(run.global_step()):.4g}.")
    if changed.keys() & {"batch_size", "processes"} and run.samples_done:
        log("  The position in the epoch is kept in images, so no image of this epoch is repeated or skipped.")
    if "seed" in changed:
        log("  A new seed reshuffles the rest of this epoch too: some of its images repeat, some are skipped.")
    if t.ema and not state.get("ema"):
        t.ema = WeightAverage(t.raw_model, cfg.ema_decay)
        log("  The weight average starts from the current weights.")


# ---------------------------------------------------------------------------------------------------- the loop

SYNC_WARNING = "called a synchronizing CUDA operation"  # the warning of torch's sync debug mode


class SyncCheck:
    """--sync-check-steps: torch.cuda.set_sync_debug_mode("warn") from the start of each step to the loop's next
    sync point, where the host waits by design, and every synchronization torch reports in between counted by
    its place in the code. Without a CUDA device torch observes none, but the steps run all the same."""

    def __init__(self, steps: int, device: torch.device):
        self.wanted, self.observed = steps, device.type == "cuda"
        self.steps, self.sites = 0, {}

    def step_begins(self) -> None:
        self.steps += 1
        if self.observed:
            torch.cuda.set_sync_debug_mode("warn")

    def sync_point(self) -> None:
        if self.observed:
            torch.cuda.set_sync_debug_mode("default")

    def showwarning(self, show, message, category, filename, lineno, file=None, line=None):
        """warnings.showwarning while the check runs: syncs are counted, every other warning goes on to `show`."""
        if SYNC_WARNING not in str(message):
            return show(message, category, filename, lineno, file, line)
        stack = [f for f in traceback.extract_stack()[:-1] if f.filename != warnings.__file__]
        loop = [i for i, f in enumerate(stack) if f.name == "train_epoch" and f.filename == __file__]
        site = " -> ".join(f"{Path(f.filename).name}:{f.lineno} {f.line}" for f in stack[loop[-1] if loop else -3:])
        self.sites[site] = self.sites.get(site, 0) + 1


@dataclass
class EpochResult:
    outcome: str  # "done"; "stop": a stop request was saved mid-epoch; "checked": --sync-check-steps ran its steps
    sums: torch.Tensor  # train loss, top-1, top-5, images, skipped images: the whole epoch, all ranks
    seconds: float  # training time of the whole epoch, across resumes
    data_wait: float  # this process's share of the time since the epoch began or resumed spent waiting for data
    first_batch_seconds: float


def train_epoch(run: Run) -> EpochResult:
    """One epoch from run.samples_done on. The host waits for the device only at the sync points, every
    --log-every steps: counts known on the host stay there until then."""
    cfg, device, data = run.cfg, run.rt.device, run.data
    data.sampler.set_epoch(run.epoch, run.samples_done)
    run.training.raw_model.train()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, top-1, top-5 since the epoch (re)started
    images = skipped_images = 0  # this process's, since the epoch (re)started
    steps, per_epoch = len(data.sampler), data.sampler.steps_per_epoch()
    bar = tqdm(total=per_epoch, initial=per_epoch - steps, unit="step", file=sys.stdout, dynamic_ncols=True,
               desc=f"epoch {run.epoch + 1}/{cfg.epochs} {data.train_set.image_size_at(run.epoch)}px",
               disable=not run.rt.master)
    started = last_sync = time.perf_counter()
    last_save, synced_steps = time.monotonic(), 0
    compiled_at_sync = (run.compile_seconds, run.compile_images)
    waiting = engine.LoaderWait(data.train_loader)
    epoch_sums = last_sums = run.carried
    for i, (batch, labels, skipped) in enumerate(waiting):
        if run.sync_check:
            run.sync_check.step_begins()
        # Decoding on the device may find a file unreadable: then it replaces the image, its label and skipped.
        x, labels, skipped = model_batch(data.to_model_input, batch, labels, skipped)
        labels = labels.to(device, non_blocking=True)
        for line in skipped:
            log(f"Skipped an unreadable training image: {line}")
        lr = run.lr_at(run.global_step())
        compiles = cfg.compile and x.shape not in run.compiled_shapes
        step_started = time.perf_counter()
        loss, logits = engine.train_step(run.training, x, labels, lr, run.global_step())
        if compiles:
            # Compiling is host work, done when the call returns; the step's own device work, queued behind it,
            # counts with the steps that follow. No sync: one step's kernels are noise beside a compile.
            run.compiled_shapes.add(x.shape)
            run.compile_seconds += time.perf_counter() - step_started
            run.compile_images += data.sampler.global_batch
        top1, top5 = engine.accuracy_counts(logits, labels)
        sums += torch.stack([loss.double() * len(labels), top1.double(), top5.double()])
        images, skipped_images = images + len(labels), skipped_images + len(skipped)
        run.samples_done += data.sampler.global_batch
        if (i + 1) % cfg.log_every and i != steps - 1:
            continue
        if run.sync_check:
            run.sync_check.sync_point()
        # The sync point: one all-reduce carries the metrics and every rank's votes, so all ranks take the same
        # decisions at the same step.
        due = run.rt.master and time.monotonic() - last_save >= cfg.checkpoint_minutes * 60
        host = [images, skipped_images, run.stop.signal_name is not None, due]
        packet = all_reduce(torch.cat([sums, torch.tensor(host, dtype=torch.float64, device=device)])).cpu()
        epoch_sums = run.carried + packet[:5]
        if not math.isfinite(epoch_sums[0]):
            raise NonFiniteLoss(f"The training loss became non-finite in epoch {run.epoch + 1} at step "
                                f"{run.global_step()}. The last good checkpoint in {run.out} is untouched. Try a "
                                f"lower --lr, or --precision bf16/fp32 instead of fp16.")
        now = time.perf_counter()
        bar.update(i + 1 - synced_steps)
        speed = steady_images_per_second((i + 1 - synced_steps) * data.sampler.global_batch, now - last_sync,
                                         run.compile_images - compiled_at_sync[1],
                                         run.compile_seconds - compiled_at_sync[0])
        report_progress(run, bar, epoch_sums, epoch_sums - last_sums, lr, speed, waiting.seconds / (now - started),
                        run.carried_seconds + now - started)
        synced_steps, last_sync, last_sums = i + 1, now, epoch_sums
        compiled_at_sync = (run.compile_seconds, run.compile_images)
        if packet[5] > 0 or packet[6] > 0:
            save(run, epoch_sums, run.carried_seconds + now - started)
            last_save = time.monotonic()
            if packet[5] > 0:
                bar.close()
                return EpochResult("stop", epoch_sums, 0.0, 0.0, 0.0)
        if run.sync_check and run.sync_check.steps >= run.sync_check.wanted:
            bar.close()
            return EpochResult("checked", epoch_sums, 0.0, 0.0, 0.0)
    bar.close()
    seconds = time.perf_counter() - started
    return EpochResult("done", epoch_sums, run.carried_seconds + seconds, waiting.seconds / max(seconds, 1e-9),
                       waiting.first_batch_seconds)


def steady_images_per_second(images: float, seconds: float, compile_images: float, compile_seconds: float) -> float:
    """img/s of the steps that compiled nothing, which is what the rest of the run will see; of all of them where
    every step compiled."""
    if images > compile_images:
        images, seconds = images - compile_images, seconds - compile_seconds
    return images / max(seconds, 1e-9)


def report_progress(run: Run, bar: tqdm, epoch_sums: torch.Tensor, window: torch.Tensor, lr: float,
                    images_per_second: float, data_wait: float, seconds: float) -> None:
    """The progress bar shows the epoch so far; TensorBoard the steps since the last sync point."""
    seen = epoch_sums[3].item()
    usd_per_hour = run.cfg.usd_per_hour
    money = {"usd": f"{usd_per_hour * (run.seconds_spent() + seconds) / 3600:.2f}"} if usd_per_hour else {}
    bar.set_postfix(loss=f"{epoch_sums[0].item() / seen:.3f}", top1=f"{100 * epoch_sums[1].item() / seen:.1f}%",
                    lr=f"{lr:.3g}", img_s=f"{images_per_second:.0f}", data_wait=f"{100 * data_wait:.0f}%", **money)
    if run.board:
        loss, top1, _, images, _ = window.tolist()
        run.board.scalars(run.images_seen(), {"train/loss": loss / images, "train/top1": 100 * top1 / images,
                                              "train/lr": lr, "speed/images_per_second": images_per_second,
                                              "speed/data_wait_pct": 100 * data_wait})


def validate(run: Run) -> dict:
    t = run.training
    models = [t.raw_model] + ([t.ema.model] if t.ema else [])
    if run.rt.world_size > 1:  # BN statistics drift apart per rank; evaluate and save rank 0's everywhere
        for buffer in (b for m in models for b in m.buffers()):
            dist.broadcast(buffer, 0)
    metrics, *ema = engine.evaluate_models(models, run.data.val_loader, run.data.to_model_input, t.amp_dtype,
                                    run.cfg.eval_flip)
    for averaged in ema:
        metrics.update({f"ema_{k}": averaged[k] for k in ("val_loss", "val_acc1", "val_acc5")})
    return metrics


def epoch_row(run: Run, epoch: EpochResult, val: dict, val_seconds: float) -> dict:
    loss, top1, top5, images, skipped = epoch.sums.tolist()
    skipped += val.pop("val_skipped")
    return {"epoch": run.epoch + 1, "lr": run.lr_at(run.global_step() - 1), "train_loss": loss / images,
            "train_acc1": 100 * top1 / images, "train_acc5": 100 * top5 / images, **val,
            "epoch_seconds": epoch.seconds, "compile_seconds": run.compile_seconds,
            "images_per_second": steady_images_per_second(images, epoch.seconds, run.compile_images,
                                                          run.compile_seconds),
            "train_images": int(images), "skipped_images": int(skipped),
            "image_size": run.data.train_set.image_size_at(run.epoch),
            "val_seconds": val_seconds, "data_wait_pct": 100 * epoch.data_wait,
            "first_batch_seconds": epoch.first_batch_seconds}


def fit(run: Run) -> int:
    cfg = run.cfg
    log(f"Training {cfg.arch} on {run.rt.world_size} x {run.rt.device.type} ({run.training.precision}), "
        f"{cfg.batch_size} images per process per step, {run.data.sampler.steps_per_epoch()} steps per epoch, "
        f"recipe {cfg.recipe}: {cfg.optimizer}, {cfg.schedule} schedule to peak LR {run.peak_lr():.4g}, "
        f"{cfg.epochs} epochs. Outputs: {run.out}")
    while run.epoch < cfg.epochs:
        epoch = train_epoch(run)
        if epoch.outcome == "stop":
            log(f"Stopped by {run.stop.signal_name}; checkpoint saved at epoch {run.epoch + 1}, "
                f"{run.samples_done:,} images into it. Rerun the same command to continue.")
            return 0
        val_started = time.perf_counter()
        val = validate(run)
        val_seconds = time.perf_counter() - val_started
        engine.check_replicas_agree(run.training.raw_model, run.rt, run.epoch)
        row = epoch_row(run, epoch, val, val_seconds)
        run.history.append(row)
        run.epoch, run.samples_done = run.epoch + 1, 0
        run.carried, run.carried_seconds = torch.zeros(5, dtype=torch.float64), 0.0
        run.compile_seconds, run.compile_images = 0.0, 0
        save(run, run.carried, 0.0)
        with leave_together(run.rt, exit_status):
            if run.rt.master:
                outputs.write_epoch_outputs(run.out, row, run.history)
        if run.board:
            run.board.scalars(run.images_seen(), {f"val/{k.replace('val_', '')}": v for k, v in row.items()
                                                  if k.startswith(("val_", "ema_val_")) and k != "val_seconds"})
        log(outputs.epoch_summary(row, cfg, run.seconds_spent(), run.rt.device.type, run.data.train_loader.num_workers))
        stop_votes = all_reduce(torch.tensor([float(run.stop.signal_name is not None)], device=run.rt.device))
        if stop_votes.item() > 0 and run.epoch < cfg.epochs:
            log(f"Stopped by a signal after epoch {run.epoch}; rerun the same command to continue.")
            return 0
    log(f"Training finished: {cfg.epochs} epochs, final val top-1 {run.history[-1]['val_acc1']:.2f}%. "
        f"Outputs in {run.out}.")
    return 0


def check_syncs(run: Run) -> int:
    """--sync-check-steps: the steps under a SyncCheck, its findings in OUTPUT_DIR/sync_check.json and the log.
    The check is no training: nothing is saved."""
    check = run.sync_check = SyncCheck(run.cfg.sync_check_steps, run.rt.device)
    with warnings.catch_warnings():
        warnings.filterwarnings("always", message=SYNC_WARNING)  # each one, not just the first at each place
        warnings.showwarning = partial(check.showwarning, warnings.showwarning)
        try:
            train_epoch(run)
        finally:
            check.sync_point()  # a step that raised left the debug mode on
    syncs = sum(check.sites.values())
    if run.rt.master:
        (run.out / "sync_check.json").write_text(json.dumps(
            {"steps": check.steps, "observed": check.observed, "syncs": syncs, "sites": check.sites}, indent=1))
    if not check.observed:
        log(f"Sync check: {check.steps} steps ran, but without a CUDA device no synchronization can be observed.")
    else:
        log(f"Sync check: {syncs} synchronizations in {check.steps} steps between the loop's sync points"
            + "".join(f"\n  {n} x {site}" for site, n in check.sites.items()))
    return 0


# ---------------------------------------------------------------------------------------------------- main

def prepare(cfg: Config) -> list[str]:
    """Everything that can fail because of the user's input, before any process group or GPU work."""
    if cfg.demo and Path(cfg.data_dir) == DEMO_DATA_DIR:
        make_demo_dataset(DEMO_DATA_DIR)
    layout = check_layout(cfg.data_dir)
    log(f"Data: {layout.summary()}")
    if cfg.init_from:
        init_weights(cfg, layout.classes)  # read again where a new run starts: a run that resumes needs none
    return layout.classes


def init_weights(cfg: Config, classes: list[str]) -> dict:
    """--init-from's checkpoint, once it is known to fit: a readable train.py (or prune.py) checkpoint of the
    same network for as many classes. Only its weights are used (and, for a pruned network, their shapes);
    optimizer, schedule and epochs start afresh."""
    path = Path(cfg.init_from)
    if not path.is_file():
        raise UsageError(f"--init-from {path}: there is no such file. Pass the checkpoint.pth of a train.py run "
                         f"(e.g. runs/demo/checkpoint.pth) to start a new run from its weights.")
    try:
        state = read_checkpoint(path)
    except Exception as err:  # torch.load fails in many ways on a file that is not a checkpoint; each means unusable
        raise UsageError(f"--init-from {path} is not a readable train.py checkpoint ({type(err).__name__}: "
                         f"{str(err)[:200]}). Pass the checkpoint.pth of a train.py run.") from err
    arch, their_classes = state["config"].get("arch"), state["class_names"]
    if len(their_classes) != len(classes):
        raise UsageError(f"--init-from {path} classifies {len(their_classes)} classes, but {cfg.data_dir} has "
                         f"{len(classes)}: its classifier cannot be trained on for this dataset. Pass a checkpoint "
                         f"trained on these {len(classes)} classes.")
    if arch != cfg.arch:
        raise UsageError(f"--init-from {path} holds a {arch}, not a {cfg.arch}. Pass --arch {arch} to start from "
                         f"its weights.")
    if their_classes != classes:
        log(f"--init-from {path} was trained on other class names; its outputs are kept in order and trained "
            f"on as this dataset's {len(classes)} classes.")
    return state


def read_run(cfg: Config, rt: Runtime):
    """The newest checkpoint in --output-dir (or None for a new run), read by rank 0 and sent to the others:
    other nodes need no shared filesystem, and one copy is read once. Rank 0, the process that writes, also
    returns the lock it holds on the folder until it exits."""
    out, state, error, lock = Path(cfg.output_dir), None, None, None
    if rt.master:
        try:
            lock = outputs.lock_output_dir(out)
            remove_stale_temporaries(out)
            if cfg.no_resume:
                outputs.move_run_aside(out)
            else:
                state = load_latest_checkpoint(out, log)
        except (CheckpointError, UsageError, OSError) as err:
            error = err
    if rt.world_size > 1:
        shared = [state, error]
        dist.broadcast_object_list(shared, src=0)
        state, error = shared
    if error is not None:
        raise error if isinstance(error, CheckpointError | UsageError) else UsageError(f"Cannot use {out}: {error}")
    return state, lock


def cpu_forecast(run: Run, step_seconds: float) -> str:
    steps = run.data.sampler.steps_per_epoch()
    epochs = run.cfg.epochs - run.epoch
    return (f"*** On the CPU an epoch takes about {outputs.format_duration(steps * step_seconds)} "
            f"({steps:,} steps of {step_seconds:.2f} s, measured just now); {epochs} epoch{'s' if epochs != 1 else ''} "
            f"to go: about {outputs.format_duration(epochs * steps * step_seconds)}. Stop with Ctrl-C unless that is "
            f"what you meant. ***")


def run_training(cfg: Config, classes: list[str], explicit: set[str], rt: Runtime) -> int:
    state, _lock = read_run(cfg, rt)
    log(outputs.where_the_run_lives(Path(cfg.output_dir).resolve()))
    if state is not None:
        cfg = resumed_config(cfg, state["config"], explicit)
    init = init_weights(cfg, classes) if state is None and cfg.init_from else None
    # The network's shapes come from the weights it continues from: a pruned one is narrower than cfg.arch.
    origin = state if state is not None else init
    pruned = origin.get("pruned") if origin is not None else None
    model = engine.build_model(cfg, len(classes), origin["model"] if pruned is not None else None)
    workers = engine.split_cores(cfg.workers, rt, cfg.threads)
    run = Run(cfg, classes, rt, engine.build_training(model, cfg, rt), engine.build_data(cfg, classes, rt, workers),
              StopRequest(rt), pruned=pruned)
    step_seconds = 0.0
    if not cfg.threads:
        threads, reason, step_seconds = engine.measure_threads(run.training, run.data, rt, workers)
        if threads:
            cfg.threads = threads
            engine.split_cores(cfg.workers, rt, threads)
            log(f"Compute threads: {threads} ({reason}); kept for this run, --threads N overrides.")
    if init is not None:
        run.training.raw_model.load_state_dict(init["model"])
        if run.training.ema:
            run.training.ema = WeightAverage(run.training.raw_model, cfg.ema_decay)
        log(f"Starting a new run from the weights in {cfg.init_from}: fresh {cfg.optimizer} optimizer, schedule and "
            f"{cfg.epochs} epochs.")
    if state is not None:
        resume(run, state)
        if rt.master:
            outputs.append_metrics(run.out / "metrics.csv", run.history)  # rows a kill kept out of the file
        if run.epoch >= cfg.epochs:
            last = run.history[-1]["val_acc1"] if run.history else float("nan")
            log(f"This run is already finished ({run.epoch} of {cfg.epochs} epochs, val top-1 {last:.2f}%). "
                f"Outputs are in {run.out}. Pass a larger --epochs to train on, or --no-resume to start over.")
            return 0
    if rt.device.type == "cpu" and len(run.data.train_set) > CPU_FORECAST_ABOVE_IMAGES:
        log(cpu_forecast(run, step_seconds or engine.measure_step_seconds(run.training, run.data)))
    if cfg.sync_check_steps:
        return check_syncs(run)
    run.board = outputs.open_board(cfg.tensorboard and rt.master, run.out, run.images_seen())
    try:
        return fit(run)
    finally:
        run.stop.disarm()
        if run.board:
            run.board.close()


def exit_status(err: Exception) -> int:
    """1 for a bug, which gets its traceback; the others get one paragraph."""
    if isinstance(err, DatasetLayoutError | UsageError | CheckpointError | DataVanishedError | FailingVolumeError):
        return EXIT_BAD_INPUT
    return EXIT_NON_FINITE if isinstance(err, NonFiniteLoss) else 1


def report(err: Exception, cfg: Config) -> int:
    """Says why the job stops, from the one process that does; returns the exit status."""
    status = exit_status(err)
    if status == 1:
        traceback.print_exception(err)
    elif isinstance(err, DataVanishedError):
        # Not str(err): re-raised from a loader worker, it holds that worker's whole traceback.
        tqdm.write(f"error: the training data in {cfg.data_dir} disappeared during training (a class folder is "
                   f"gone: moved, deleted or unmounted). The checkpoints in {cfg.output_dir} are intact: restore "
                   f"or remount the data and rerun the same command to continue from them.", file=sys.stderr)
    elif isinstance(err, FailingVolumeError):
        # Re-raised from a loader worker, the message follows that worker's traceback.
        files = str(err).rsplit(f"{FailingVolumeError.__name__}: ", 1)[-1]
        tqdm.write(f"error: {files}\nThe checkpoints in {cfg.output_dir} are intact: check the data volume, then "
                   f"rerun the same command to continue from them.", file=sys.stderr)
    else:
        tqdm.write(f"error: {err}", file=sys.stdout if status == EXIT_NON_FINITE else sys.stderr)
    return status


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg, explicit = parse_args(argv)
    every_rank_here = False  # whether the others are known to leave at this same point, as after a finished run
    rt = None
    try:
        device_type = resolve_device(cfg.device)  # first: a GPU box whose torch cannot use its GPUs does no work
        classes = prepare(cfg)
        if device_type == "cuda" and "RANK" not in os.environ and torch.cuda.device_count() > 1:
            outputs.lock_output_dir(Path(cfg.output_dir)).close()  # refuse a busy folder before starting N processes
            return launch_one_process_per_gpu(__file__, argv)
        rt = setup_distributed(device_type)
        status = run_training(cfg, classes, explicit, rt)
        every_rank_here = True
        return status
    except JobFailed as failed:
        return failed.exit_status if failed.cause is None else report(failed.cause, cfg)
    except Exception as err:
        # Before the process group, every process meets the same errors (a bad --data-dir): rank 0 reports them.
        # After it, the first process to fail says why, whichever it is (one rank's data can vanish, one rank
        # can hit a bug); the others' collectives break because it left (gloo), or they failed alike.
        if not (mark_failed(rt) if rt else is_master_process()):
            return exit_status(err)
        if exit_status(err) == 1:
            raise
        return report(err, cfg)
    finally:
        # An error re-raised from a loader worker sits in a reference cycle with the loader's iterator, which
        # only the cyclic GC frees. Free it now so the iterator shuts its workers down: left to the exit
        # handlers, a worker gets a plain SIGTERM and waits out its WORKER_GRACE_SECONDS reprieve.
        gc.collect()
        # Since torch 2.6 destroying NCCL communicators waits for every rank (pytorch/pytorch#141510): after an
        # error the others may be waiting in a collective this process never joins, or gone. Exiting without it
        # aborts the communicators instead, and torchrun then stops the others at once.
        if dist.is_initialized() and every_rank_here:
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
