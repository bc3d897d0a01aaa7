"""`python benchmark.py gpu-check`: every measurement of benchmark.py on one rented GPU box within a time budget
(8 minutes by default), written as JSON lines and as a markdown table ready for BENCHMARKS.md. benchmark.py
parses its flags and calls gpu_check(); this module holds the plan, the budget and the report, and takes its
measurements from measure.py.
"""

import argparse
import contextlib
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from functools import partial
from pathlib import Path

import torch

from config import Config
from dali_decode import dali_missing
from data import list_samples, simplejpeg_missing, usable_cores
from dataset_paths import check_layout
from engine import build_data
from gpu_decode import model_batch
from measure import (
    MODELS,
    REPO,
    STOP_GRACE_SECONDS,
    MeasurementFailed,
    OutOfTime,
    decode_routes,
    environment,
    non_negative_int,
    one_gpu_env,
    positive_float,
    positive_int,
    reference_loader,
    run_until,
    shares,
    significant,
    time_loader,
    time_train_script,
    time_train_steps,
    write_dataset,
)
from runtime import Runtime, native_bf16

# Each section's weight in the time budget. Time a section leaves unused passes on to the later ones, and
# torch.compile (about a minute per measurement, mostly compiling) comes last, to take what is left.
SECTION_WEIGHTS = {"make-data": 0.12, "compute": 0.10, "loader": 0.15, "train": 0.38, "sync-check": 0.10,
                   "compile": 0.15}
GPU_ONLY_SECTIONS = {"compute", "compile"}
NO_CUDA = "no CUDA device"


def process_age() -> float:
    """Seconds since this process started, imports included; 0 where /proc cannot tell."""
    try:
        started = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22, in ticks
        return max(float(Path("/proc/uptime").read_text().split()[0]) - started / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return 0.0


class Budget:
    """Deadlines, in time.monotonic(), for the sections of a run that must end within `minutes`."""

    def __init__(self, minutes: float, weights: dict[str, float]):
        # A subprocess stopped at its deadline may take STOP_GRACE_SECONDS more to save and exit.
        self.end = time.monotonic() - process_age() + minutes * 60 - STOP_GRACE_SECONDS - 2
        self.weights = dict(weights)

    def deadline(self, section: str) -> float:
        """The section's share of the time left, weighed against the sections still to come."""
        weight = self.weights.pop(section, 0.0)
        now = time.monotonic()
        return now + max(self.end - now, 0.0) * (weight / (weight + sum(self.weights.values())) if weight else 0.0)


def time_cap(section: str, deadline: float, estimate: float = 0.0) -> str | None:
    left = deadline - time.monotonic()
    if left <= max(estimate, 1.0):
        return f"the {section} section's time cap: {max(left, 0):.0f} s left, about {estimate:.0f} s needed"
    return None


def route_unavailable(route: str, cuda: bool) -> str | None:
    """Why an input route cannot be measured on this box, or None. Every route of train.py decodes some files in
    its loader workers, so all of them need simplejpeg; the torchvision reference needs nothing more."""
    if route == "torchvision":
        return None
    if simplejpeg_missing():
        return "simplejpeg is not installed (pip install -r requirements.txt)"
    if route == "cpu":
        return None
    if not cuda:
        return NO_CUDA
    if route not in decode_routes():
        return f"train.py --decode has no {route} route in this version (it takes {', '.join(decode_routes())})"
    if route == "dali" and dali_missing():  # not installed, or installed for another CUDA and failing to load
        return f"nvidia-dali cannot be imported ({dali_missing()}; pip install -r requirements-dali.txt)"
    return None


def measure_loader(route: str, share: float | None, root: Path, args, device: torch.device, seconds: float) -> float:
    """img/s of an input route until its batches are ready for the model on `device`, as train.py gets them."""
    if route == "torchvision":
        dl = reference_loader(root / "train", args.image_size, args.batch_size, args.workers)

        def prepare(images, labels):
            return images.to(device, non_blocking=True)
    else:
        cfg = Config(data_dir=str(root), batch_size=args.batch_size, image_size=args.image_size, decode=route,
                     gpu_decode_share=1.0 if share is None else share)
        with contextlib.redirect_stdout(sys.stderr):  # the route's log line; stdout is for results
            data = build_data(cfg, check_layout(root).classes, Runtime(device=device), args.workers, with_val=False)
        dl = data.train_loader

        def prepare(images, labels, skipped):
            return model_batch(data.to_model_input, images, labels, skipped)[0]

    def finish(*batch):
        images = prepare(*batch)
        if device.type == "cuda":
            torch.cuda.synchronize()  # a batch counts once the device has it
        return images

    return time_loader(dl, seconds, finish=finish)


def sync_check(root: Path, args, deadline: float, cuda: bool) -> dict:
    """`python train.py --sync-check-steps` (bf16, `--decode cpu`: the defaults on a bf16 GPU without DALI):
    fails if its step loop synchronizes the host anywhere but at its sync points. fp16 would: GradScaler.step
    reads its found-inf flag on the host every step. So would --decode gpu: the decoder drains the stream before
    nvJPEG runs (see gpu_decode.DeviceBatchDecoder.decode). Without a GPU the steps run, in the CPU's fp32 (bf16
    is slower there), and nothing can be observed."""
    precision = "bf16" if cuda else "fp32"
    row = {"what": "sync-check", "precision": precision, "decode": "cpu", "log_every": Config.log_every}
    with tempfile.TemporaryDirectory(prefix="sync-check-") as out:
        result = Path(out) / "sync_check.json"
        command = [sys.executable, str(REPO / "train.py"), "--data-dir", str(root), "--output-dir", out,
                   "--sync-check-steps", str(args.steps), "--epochs", "1", "--batch-size", str(args.batch_size),
                   "--image-size", str(args.image_size), "--workers", str(args.workers), "--precision", precision,
                   "--decode", "cpu", "--no-tensorboard"]
        stopped = False
        try:
            code = run_until(command, deadline, stdout=sys.stderr, env=one_gpu_env())
        except OutOfTime:  # train.py stopped at SIGTERM: the steps it ran were checked
            code, stopped = None, True
        found = json.loads(result.read_text()) if result.exists() else None
    if not (found and found["steps"]):
        if stopped:
            return {**row, "status": "skipped", "reason": "the sync-check section's time cap, before the first "
                                                          "sync point"}
        return {**row, "status": "failed", "reason": f"train.py --sync-check-steps wrote no result (exit status "
                                                     f"{code}; its error is above)"}
    row.update(steps=found["steps"], syncs=found["syncs"], sites=found["sites"])
    if code:
        return {**row, "status": "failed", "reason": f"train.py --sync-check-steps failed (exit status {code})"}
    if not found["observed"]:
        return {**row, "status": "skipped", "reason": f"{NO_CUDA}: synchronizations cannot be observed; "
                                                      f"{found['steps']} steps ran through train.py's loop"}
    if found["sites"]:
        return {**row, "status": "failed", "reason": "the step loop synchronizes between sync points"}
    return {**row, "status": "ok", **({"note": "stopped at its time cap"} if stopped else {})}


def default_out() -> Path:
    stem = REPO / "measurements" / f"gpu-check-{datetime.date.today().isoformat()}"
    path, n = stem.with_suffix(".jsonl"), 2
    while path.exists():  # a second run the same day keeps the first one's file
        path, n = stem.with_name(f"{stem.name}-{n}.jsonl"), n + 1
    return path


def code_version() -> str | None:
    """The commit measured (with -dirty for local changes), so a figure can be traced to its code."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):  # no git, or not a checkout
        return None


def compute_settings(model: str, precision: str, size: int, compiled: bool, batch_size: int) -> dict:
    return dict(what="compute", model=model, precision=precision, compile=compiled, image_size=size,
                batch_size=batch_size, channels_last=True)


class GpuCheck:
    """One run of gpu-check: its sections share the rows measured so far, the time budget and the JSONL file."""

    def __init__(self, args, out):
        self.args, self.out, self.rows = args, out, []
        self.cuda = torch.cuda.is_available()
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.budget = Budget(args.minutes, {k: w for k, w in SECTION_WEIGHTS.items()
                                            if self.cuda or k not in GPU_ONLY_SECTIONS})
        self.no_data = "no data: make-data did not finish"
        sizes = list(dict.fromkeys([args.image_size, *args.compute_sizes]))
        self.grid = [(p, s, m) for p in ("bf16", "fp16") for s in sizes for m in MODELS]
        self.routes = [("torchvision", None), ("cpu", None), ("dali", None),
                       *(("gpu", share) for share in args.gpu_decode_shares)]

    def record(self, **row) -> dict:
        self.rows.append(row)
        if self.args.json:
            print(json.dumps(row), flush=True)
        self.out.write(json.dumps(row) + "\n")
        self.out.flush()  # what was measured survives a kill
        return row

    def failed(self, err: Exception, **row) -> dict:
        traceback.print_exc()  # the whole story on stderr; the row carries its last line
        return self.record(**row, status="failed", reason=f"{type(err).__name__}: {err}")

    def precision_unavailable(self, precision: str) -> str | None:
        if not self.cuda:
            return NO_CUDA
        return "no bf16 on this GPU" if precision == "bf16" and not native_bf16() else None

    def make_data(self, root: Path) -> None:
        """The JPEGs every input route reads."""
        args, deadline = self.args, self.budget.deadline("make-data")
        try:
            import sklearn  # noqa: F401  (the photographs the JPEGs are cut from)
        except ImportError:
            self.no_data = "no data: make-data needs scikit-learn (pip install -r requirements.txt)"
            self.record(what="make-data", status="skipped", reason="scikit-learn is not installed (pip install -r "
                                                                   "requirements.txt)")
            return
        row = write_dataset(root, args.images, args.classes, deadline)
        del row["out"]  # a temporary folder
        row["train_images"] = len(list_samples(root / "train", check_layout(root).classes)[1])
        if row["train_images"] < args.batch_size:
            self.record(**row, status="failed", reason=f"{row['train_images']} train images written before the "
                                                       f"time cap, fewer than one batch")
            self.no_data = "no data: make-data wrote fewer images than one batch"
        else:
            self.record(**row, status="ok")
            self.no_data = None

    def compute(self) -> None:
        """Compute only, eager, in this process: each measurement takes seconds."""
        deadline, estimate = self.budget.deadline("compute"), 0.0
        for precision, size, model in self.grid:
            settings = compute_settings(model, precision, size, False, self.args.batch_size)
            reason = self.precision_unavailable(precision) or time_cap("compute", deadline, estimate)
            if reason:
                self.record(**settings, status="skipped", reason=reason)
                continue
            begun = time.monotonic()
            step_args = argparse.Namespace(precision=precision, compile=False, batch_size=self.args.batch_size,
                                           image_size=size, channels_last=True, warmup=self.args.warmup)
            try:
                img_s = time_train_steps(MODELS[model](), step_args, self.device, self.args.compute_steps)
            except Exception as err:  # recorded; the exit status says so
                self.failed(err, **settings)
                continue
            estimate = time.monotonic() - begun
            self.record(**settings, status="ok", img_s=significant(img_s),
                        ms_step=round(1000 * self.args.batch_size / img_s, 2))

    def compile(self) -> None:
        """Compute only under torch.compile, each measurement in its own process: compiling takes about a
        minute, and a process can be stopped at the deadline."""
        args = self.args
        deadline, estimate = self.budget.deadline("compile"), 0.0
        for precision, size, model in self.grid:
            settings = compute_settings(model, precision, size, True, args.batch_size)
            reason = self.precision_unavailable(precision) or time_cap("compile", deadline, estimate)
            if reason:
                self.record(**settings, status="skipped", reason=reason)
                continue
            begun = time.monotonic()
            command = [sys.executable, str(REPO / "benchmark.py"), "compute", "--json", "--compile", "--rounds",
                       "1", "--models", model, "--precision", precision, "--image-size", str(size),
                       "--batch-size", str(args.batch_size), "--steps", str(args.compute_steps), "--warmup",
                       str(args.warmup)]
            with tempfile.TemporaryFile("w+") as results:
                try:
                    code = run_until(command, deadline, stdout=results, env=one_gpu_env())
                except OutOfTime:
                    self.record(**settings, status="skipped",
                                reason="the compile section's time cap, before it finished")
                    continue
                results.seek(0)
                rows = [json.loads(line) for line in results if line.startswith("{")]
            measured = [row for row in rows if row["what"] == "compute"]
            if code or not measured:
                self.record(**settings, status="failed", reason=f"benchmark.py compute --compile failed (exit status "
                                                                 f"{code}; its error is above)")
                continue
            estimate = time.monotonic() - begun
            self.record(**settings, status="ok", img_s=measured[0]["img_s"], ms_step=measured[0]["ms_step"],
                        seconds_with_compilation=round(estimate, 1))

    def loaders(self, root: Path) -> None:
        """Each input route alone: batches ready on the device."""
        args = self.args
        deadline, estimate = self.budget.deadline("loader"), 0.0
        for route, share in self.routes:
            settings = dict(what="loader", route=route, **({} if share is None else {"gpu_decode_share": share}),
                            workers=args.workers, batch_size=args.batch_size, image_size=args.image_size)
            reason = self.no_data or route_unavailable(route, self.cuda) or time_cap("loader", deadline, estimate)
            if reason:
                self.record(**settings, status="skipped", reason=reason)
                continue
            begun = time.monotonic()
            seconds = max(min(args.loader_seconds, (deadline - begun) / 2), 0.5)  # the rest: workers starting
            try:
                img_s = measure_loader(route, share, root, args, self.device, seconds)
            except Exception as err:  # recorded; the exit status says so
                self.failed(err, **settings)
                continue
            estimate = time.monotonic() - begun
            self.record(**settings, status="ok", img_s=significant(img_s))

    def train_runs(self, root: Path) -> None:
        """train.py end to end on each of its input routes, related to compute-only."""
        args = self.args
        if self.cuda:  # train.py needs the memory this process cached
            torch.cuda.empty_cache()
        compute_only = {(r["precision"], r["image_size"]): r["img_s"] for r in self.rows if r["what"] == "compute"
                        and r["status"] == "ok" and r["model"] == "project" and not r["compile"]}
        deadline, estimate = self.budget.deadline("train"), 0.0
        for route, share in self.routes[1:]:
            settings = dict(what="train", decode=route, **({} if share is None else {"gpu_decode_share": share}))
            reason = self.no_data or route_unavailable(route, self.cuda) or time_cap("train", deadline, estimate)
            if reason:
                self.record(**settings, status="skipped", reason=reason)
                continue
            begun = time.monotonic()
            run_args = argparse.Namespace(data_dir=root, steps=args.steps, batch_size=args.batch_size,
                                          image_size=args.image_size, workers=args.workers, precision="auto",
                                          compile=False, decode=route)
            try:
                row = time_train_script(run_args, 1.0 if share is None else share, deadline)
            except OutOfTime:
                self.record(**settings, status="skipped", reason="the train section's time cap, before train.py "
                                                                 "finished")
                continue
            except MeasurementFailed as err:
                self.record(**settings, status="failed", reason=str(err))
                continue
            estimate = time.monotonic() - begun
            reference = compute_only.get((row["precision"], args.image_size))
            self.record(**{**row, **settings}, status="ok", compute_only_img_s=reference,
                        ratio=reference and round(row["img_s"] / reference, 3),
                        steady_ratio=reference and round(row["steady_img_s"] / reference, 3))

    def sync(self, root: Path) -> None:
        deadline = self.budget.deadline("sync-check")
        # Without a GPU it still runs: the steps go through train.py's loop, though no sync can be seen.
        reason = ((self.cuda and self.precision_unavailable("bf16")) or self.no_data
                  or route_unavailable("cpu", self.cuda) or time_cap("sync-check", deadline))
        if reason:
            self.record(what="sync-check", status="skipped", reason=reason)
        else:
            self.record(**sync_check(root, self.args, deadline, self.cuda))


def gpu_check(args) -> int:
    """Every measurement of this file on one box, within --minutes, to a JSONL file and a markdown table."""
    torch.backends.cudnn.benchmark = True
    started = time.monotonic() - process_age()
    jsonl = args.out or default_out()
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    with open(jsonl, "w") as out, tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        check, root = GpuCheck(args, out), Path(tmp) / "data"
        check.record(**environment(), code=code_version(), command=" ".join(sys.argv),
                     settings={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()})
        # The compiled runs come last: they take whatever time is left.
        sections = {"make-data": partial(check.make_data, root), "compute": check.compute,
                    "loader": partial(check.loaders, root), "train": partial(check.train_runs, root),
                    "sync-check": partial(check.sync, root), "compile": check.compile}
        try:
            for name, section in sections.items():
                try:
                    section()
                except Exception as err:  # recorded, and the sections after it still run
                    check.failed(err, what="section", section=name)
                    check.budget.weights.pop(name, None)  # its share of the time passes on
        finally:  # a Ctrl-C too leaves the rows so far, and their table
            seconds = time.monotonic() - started
            table = markdown(check.rows, jsonl, seconds)
            counts = {s: sum(r.get("status") == s for r in check.rows[1:]) for s in ("ok", "skipped", "failed")}
            check.record(what="summary", status="failed" if counts["failed"] else "ok", seconds=round(seconds),
                         minutes=args.minutes, **counts, jsonl=str(jsonl), markdown=str(jsonl.with_suffix(".md")))
            jsonl.with_suffix(".md").write_text(table)
            print("\n" + table, file=sys.stderr)
    return 1 if counts["failed"] else 0


ROUTE_NAMES = {"torchvision": "torchvision reference (ImageFolder + PIL)", "cpu": "`--decode cpu`",
               "gpu": "`--decode gpu`", "dali": "`--decode dali`"}


def number(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def md_table(header: list[str], lines: list[list[str]]) -> list[str]:
    def cells(values):
        return "| " + " | ".join(str(v).replace("|", "\\|") for v in values) + " |"
    return [cells(header), "|" + "---|" * len(header), *map(cells, lines), ""]


def outcome(row: dict, columns: int, measured) -> list[str]:
    """The measured cells of a row, or its status and reason in the first of them."""
    if row["status"] == "ok":
        return measured(row)
    return [f"{row['status']}: {row['reason']}"] + [""] * (columns - 1)


def markdown(rows: list[dict], jsonl: Path, seconds: float) -> str:
    """The run as BENCHMARKS.md presents a box: a heading naming it, what was run, a table per section."""
    env, settings = rows[0], rows[0]["settings"]
    of = {what: [r for r in rows if r["what"] == what] for what in ("make-data", "compute", "loader", "train",
                                                                   "sync-check")}
    counts = {s: sum(r.get("status") == s for r in rows[1:]) for s in ("ok", "skipped", "failed")}
    data = next((r for r in of["make-data"] if r["status"] == "ok"), None)
    shown = jsonl.relative_to(REPO) if jsonl.is_relative_to(REPO) else jsonl
    lines = [f"## {env['gpu'] or 'No GPU'}, {env['cpus']} CPU cores ({datetime.date.today().isoformat()}): "
             f"`python benchmark.py gpu-check`", "",
             f"torch {env['torch']}, torchvision {env['torchvision']}, Python {env['python']}, code "
             f"`{env['code']}`. Batch {settings['batch_size']}; "
             + (f"{data['images']:,} generated JPEGs (mean {data['mean_kb']} KB, {data['train_images']:,} of them "
                f"train) in {settings['classes']} classes; " if data else "no generated data; ")
             + f"loader workers: {settings['workers']}. {counts['ok']} measurements, {counts['skipped']} skipped, "
             f"{counts['failed']} failed, in {seconds:.0f} s of a {settings['minutes']:g}-minute budget; one run "
             f"each. Raw rows: `{shown}`.", "",
             *[line for r in rows if r["what"] == "section" for line in (
                 f"The {r['section']} section stopped: {r['reason']} (the sections after it went on).", "")],
             "### Compute only", "",
             f"train.py's step (`engine.train_step`) on a synthetic batch resident on the GPU, channels_last; "
             f"{settings['warmup']} warm-up and {settings['compute_steps']} timed steps.", ""]
    measured = [r for r in of["compute"] if r["status"] != "skipped"]
    lines += md_table(["model", "precision", "compile", "px", "img/s", "ms/step"], [
        ["`model.resnet50`" if r["model"] == "project" else "`torchvision.models.resnet50`", r["precision"],
         "yes" if r["compile"] else "no", r["image_size"],
         *outcome(r, 2, lambda r: [number(r["img_s"]), f"{r['ms_step']:.1f}"])] for r in measured]) if measured else []
    skipped: dict[str, dict[str, None]] = {}  # reason: settings, in the order measured
    for r in of["compute"]:
        if r["status"] == "skipped":  # a whole grid of them without a GPU: one line per reason, not a row each
            skipped.setdefault(r["reason"].split(":")[0], {}).setdefault(
                f"{r['precision']} {'compiled' if r['compile'] else 'eager'} at {r['image_size']} px")
    lines += [f"Not measured ({reason}): {', '.join(what)}." for reason, what in skipped.items()]
    lines += ["", "### Input routes", "",
              f"Each route alone, {settings['image_size']} px: images per second until a batch is ready on the "
              f"device, {settings['loader_seconds']:g} s each after 3 warm-up batches.", ""]
    lines += md_table(["input route", "GPU decode share", "img/s"], [
        [ROUTE_NAMES[r["route"]], r.get("gpu_decode_share", ""), *outcome(r, 1, lambda r: [number(r["img_s"])])]
        for r in of["loader"]])
    lines += ["### train.py end to end", "",
              f"`python train.py` on the same JPEGs, {settings['image_size']} px, its default precision, no compile: a "
              f"warm-up epoch, then whole epochs covering {settings['steps']} steps. Steady leaves out each epoch's "
              f"first batch (loader start-up); the ratio is to compute-only in the same precision and size.", ""]
    lines += md_table(["input route", "GPU decode share", "img/s", "steady img/s", "waiting for data",
                       "steady / compute-only"], [
        [ROUTE_NAMES[r["decode"]], r.get("gpu_decode_share", ""), *outcome(r, 4, lambda r: [
            number(r["img_s"]), number(r["steady_img_s"]), f"{r['data_wait_pct']:.0f}%",
            "" if r["steady_ratio"] is None else f"{r['steady_ratio']:.2f}x"])] for r in of["train"]])
    lines += ["### Sync check", "",
              f"`python train.py --sync-check-steps {settings['steps']}` (bf16, `--decode cpu`): does its step loop, "
              f"under `torch.cuda.set_sync_debug_mode(\"warn\")`, make the host wait for the GPU anywhere but at its "
              f"sync points? Without a GPU the steps run (in fp32) but nothing can be observed.", ""]
    lines += md_table(["result", "where"], [
        [f"{r['status']}: no sync in {r['steps']} steps" if r["status"] == "ok" else
         f"{r['status']}: {r['reason']}" + (f" ({r['syncs']} in {r['steps']} steps)" if r.get("sites") else ""),
         "; ".join(f"{n} x {site}" for site, n in r.get("sites", {}).items())] for r in of["sync-check"]])
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="also print each JSON line on stdout")
    parser.add_argument("--out", type=Path, help="the JSON lines file (default: measurements/gpu-check-<date>.jsonl)")
    parser.add_argument("--minutes", type=positive_float, default=8,
                        help="stop, and write what was measured, before this")
    parser.add_argument("--images", type=positive_int, default=20_000,
                        help="train JPEGs to generate (and a tenth for val)")
    parser.add_argument("--classes", type=positive_int, default=10)
    parser.add_argument("--batch-size", type=positive_int, default=256)
    parser.add_argument("--image-size", type=positive_int, default=224, help="of the input routes and train.py runs")
    parser.add_argument("--compute-sizes", type=pixel_sizes, default=[224, 176],
                        help="compute-only sizes, besides --image-size")
    parser.add_argument("--steps", type=positive_int, default=50,
                        help="train.py: timed steps (whole epochs), after a warm-up epoch; the sync check's steps")
    parser.add_argument("--compute-steps", type=positive_int, default=30)
    parser.add_argument("--warmup", type=non_negative_int, default=10, help="compute-only: untimed steps first")
    parser.add_argument("--workers", type=non_negative_int, default=max(1, usable_cores() - 1))
    parser.add_argument("--loader-seconds", type=positive_float, default=8, help="per input route")
    parser.add_argument("--gpu-decode-shares", type=shares, default=[0.25, 0.5, 1.0],
                        help="--decode gpu is measured at each of these --gpu-decode-share values")


def pixel_sizes(text: str) -> list[int]:
    try:
        return [positive_int(v) for v in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected image sizes in pixels separated by commas, got {text!r}") from None
