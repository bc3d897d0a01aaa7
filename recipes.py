"""What a training run is made of besides the loop: the learning-rate schedules, which parameters get
weight decay, the weight average (EMA), the named presets behind --recipe, and a dated table of instance
prices for the cost figures. The schedules are pure functions of the step, so a resumed or re-planned run
needs no scheduler state and the tests can check every value.
"""

import copy
import math

import torch

SCHEDULES = ("onecycle", "linear", "cosine", "step", "poly")
POLY_POWER = 2  # --schedule poly: MLPerf's ResNet-50 LARS runs decay the LR as (1 - progress) ** 2
# --schedule step divides the LR by 10 at these fractions of the run: epochs 30, 60 and 80 of 90, as in
# Goyal et al. 2017 (torchvision's classic recipe drops at 30 and 60 only).
STEP_MILESTONES = (1 / 3, 2 / 3, 8 / 9)

# --optimizer: what each one brings when the recipe in use was tuned for another (explicit flags still win). The
# peak LR is quoted per lr_reference_batch images of global batch, as published, and scaled to the actual batch by
# lr_scaling. sgd is Config's own values: the original run's 0.175 per 256 images, linear scaling (Goyal et al.).
# LARS, LAMB and Adam-type steps grow slower than the batch: timm's training script scales adaptive optimizers
# by the square root of the batch ratio, and NVIDIA's own LARS configs (LR 7.4 at 1,600 images, 11.0 at 3,200)
# grow by 1.49x for a doubled batch, nearer sqrt(2) than 2. BatchNorm parameters and biases are never decayed
# under the three (timm's and ConvNeXt's recipes exclude them; for LARS and LAMB it is forced, see engine.py).
OPTIMIZER_DEFAULTS = {
    "sgd": dict(lr=0.175, weight_decay=1e-4, lr_reference_batch=256, lr_scaling="linear", bias_decay=True),
    # NVIDIA's MLPerf Training v4.0 ResNet-50 on 8 x H200: LR 11.0 at 8 x 400 images, weight decay 5e-5.
    "lars": dict(lr=11.0, weight_decay=5e-5, lr_reference_batch=3200, lr_scaling="sqrt", bias_decay=False),
    # "ResNet strikes back" (Wightman et al. 2021) procedure A3: LAMB, LR 8e-3 at 2,048 images, weight decay 0.02.
    "lamb": dict(lr=8e-3, weight_decay=0.02, lr_reference_batch=2048, lr_scaling="sqrt", bias_decay=False),
    # ConvNeXt's modernized ResNet-50 (Liu et al. 2022): AdamW, LR 4e-3 at 4,096 images, weight decay 0.05.
    "adamw": dict(lr=4e-3, weight_decay=0.05, lr_reference_batch=4096, lr_scaling="sqrt", bias_decay=False),
}
# LARS and LAMB rescale each layer's step by a trust ratio (timm's implementations).
LAYERWISE_OPTIMIZERS = ("lars", "lamb")

# --recipe presets. Precedence: train.Config's defaults < the recipe < --demo's settings < explicit flags.
RECIPES = {
    # The original run: 50 epochs of one-cycle at peak 0.175 with batch 256, which reached 74.99% top-1. On more
    # GPUs the peak grows with the global batch (0.175 per 256 images): the same LR per image, which the
    # one-cycle warm-up over 30% of the run carries to 8k-image batches (Goyal et al.).
    "seed": dict(lr_reference_batch=256),
    # Time-to-accuracy choices after FFCV's ResNet-50 configs (SGD, label smoothing 0.1, no weight decay on
    # BatchNorm, linear warm-up to a peak at epoch 2 then linear decay to zero, 160 -> 192 px training, 256 px
    # evaluation with flip averaging; published 75.6% in 24 and 76.6% in 32 epochs on 8 A100s, with BlurPool,
    # which this model does not have, hence 32 epochs here). The peak LR follows the linear scaling rule:
    # 0.1 per 256 images of global batch (Goyal et al.; FFCV's 1.7 at 4,096 images is 0.106 per 256).
    "fast": dict(schedule="linear", warmup_epochs=2.0, epochs=32, lr=0.1, lr_reference_batch=256,
                 label_smoothing=0.1, bias_decay=False, start_image_size=160, image_size=192, eval_image_size=256,
                 eval_flip=True),
    # Large batches on 8 GPUs and more, after NVIDIA's MLPerf Training v4.0 ResNet-50 submission on 8 x H200
    # (config_DGXH100.sh, common/fit.py and common/optimizer.py of h200_ngc24.04_mxnet): LARS with trust
    # coefficient 0.001 and momentum 0.9, peak LR 11.0 for 3,200 images (8 x 400), 2 epochs of linear warm-up
    # from zero, then polynomial decay of power 2 to 1e-4 at epoch 37; weight decay 5e-5, none on BatchNorm
    # and biases (nor any trust ratio); label smoothing 0.1. div_factor 1e5 starts the warm-up at about zero,
    # final_div_factor 1.1 ends at 11.0 / 1.1e5 = 1e-4.
    "lars": dict(optimizer="lars", **OPTIMIZER_DEFAULTS["lars"], schedule="poly", warmup_epochs=2.0, epochs=37,
                 momentum=0.9, label_smoothing=0.1, div_factor=1e5, final_div_factor=1.1),
}

# --instance-type: US dollars per hour for the whole instance (Linux, US East). Prices change and differ by
# kind (on-demand, capacity blocks, spot): each entry says which price it is and when it was read. Pass
# --usd-per-hour for what you actually pay.
INSTANCE_PRICES = {
    "g4dn.xlarge": (0.526, "1x T4; AWS on-demand list price as long quoted, not re-checked on 2026-11-26"),
    "g5.xlarge": (1.006, "1x A10G; AWS on-demand, us-east-1, as quoted for June 2026"),
    "p3.2xlarge": (3.06, "1x V100; AWS on-demand list price as long quoted, not re-checked on 2026-11-26"),
    "p4d.24xlarge": (32.77, "8x A100 40 GB; AWS on-demand list price before AWS's June 2025 GPU price cut"),
    "p5.48xlarge": (39.33, "8x H100; AWS EC2 Capacity Blocks effective rate, us-east-1, published for 2025"),
}


def onecycle_lr(step: int, total_steps: int, peak: float, pct_start: float, div_factor: float,
                final_div_factor: float) -> float:
    """torch's OneCycleLR (cosine annealing, two phases, momentum not cycled) as a pure function."""
    start, end = peak / div_factor, peak / div_factor / final_div_factor
    step = min(step, total_steps - 1)
    warmup_end = pct_start * total_steps - 1
    if step <= warmup_end:
        lo, hi, frac = start, peak, step / warmup_end
    else:
        lo, hi, frac = peak, end, (step - warmup_end) / (total_steps - 1 - warmup_end)
    return hi + (lo - hi) / 2 * (math.cos(math.pi * frac) + 1)


def learning_rate(schedule: str, step: int, total_steps: int, warmup_steps: int, peak: float, pct_start: float,
                  div_factor: float, final_div_factor: float) -> float:
    """The LR before optimizer step `step` (0-based) of `total_steps`.

    Every schedule starts at peak / div_factor. onecycle warms up over pct_start of the run (cosine); the
    others rise linearly over warmup_steps, then: linear, cosine and poly (end + (peak - end) * (1 -
    progress) ** POLY_POWER) fall to end = peak / div_factor / final_div_factor at the last step, step holds
    the peak and divides it by 10 at each STEP_MILESTONES fraction of the run.
    """
    if schedule == "onecycle":
        return onecycle_lr(step, total_steps, peak, pct_start, div_factor, final_div_factor)
    start, end = peak / div_factor, peak / div_factor / final_div_factor
    step = min(step, total_steps - 1)
    if step < warmup_steps:
        return start + (peak - start) * step / warmup_steps
    if schedule == "step":
        return peak * 0.1 ** sum(step >= m * total_steps for m in STEP_MILESTONES)
    frac = (step - warmup_steps) / max(1, total_steps - 1 - warmup_steps)
    if schedule == "linear":
        return peak + (end - peak) * frac
    if schedule == "cosine":
        return end + (peak - end) * (1 + math.cos(math.pi * frac)) / 2
    if schedule == "poly":
        return end + (peak - end) * (1 - frac) ** POLY_POWER
    raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")


def peak_lr(lr: float, reference_batch: int, global_batch: int, scaling: str = "linear") -> float:
    """--lr as given, or scaled from a reference global batch to the actual one: linearly, or by the square root
    of the ratio."""
    if not reference_batch:
        return lr
    ratio = global_batch / reference_batch
    return lr * (ratio if scaling == "linear" else math.sqrt(ratio))


def parameter_groups(model: torch.nn.Module, weight_decay: float, bias_decay: bool) -> list[dict]:
    """Two SGD groups: weights that multiply inputs (conv kernels, the fc matrix: 2-D and more) and
    everything 1-D (biases, BatchNorm scales and shifts). Chosen by shape, so it holds for any module names.
    The grouping never changes, so a checkpoint's optimizer state loads whatever --bias-decay says now."""
    matrices = [p for p in model.parameters() if p.ndim > 1]
    vectors = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": matrices, "weight_decay": weight_decay},
            {"params": vectors, "weight_decay": weight_decay if bias_decay else 0.0}]


class WeightAverage:
    """An exponential moving average of `model`'s parameters and BatchNorm statistics, updated after every
    optimizer step. The decay ramps up as min(decay, (1 + step) / (10 + step)) so that early averages are
    not dominated by the random initial weights; it depends only on the step, so resume is exact."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        # The tensors are updated in place (optimizer steps, load_state_dict), so the pairs are found once
        # here rather than on every step.
        pairs = list(zip(self.model.state_dict().values(), model.state_dict().values(), strict=True))
        self.floats = [pair for pair in pairs if pair[0].is_floating_point()]
        self.counters = [pair for pair in pairs if not pair[0].is_floating_point()]  # BatchNorm's step counts

    @torch.no_grad()
    def update(self, step: int) -> None:
        weight = 1 - min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_([ours for ours, _ in self.floats], [theirs for _, theirs in self.floats], weight)
        for ours, theirs in self.counters:
            ours.copy_(theirs)
