"""--recipe presets, the LR schedules, weight decay by parameter shape, the weight average (EMA) and the
evaluation settings a recipe changes."""


import pytest
import torch

from compare_recipes import PHOTOS, TRAIN_PER_CLASS, VAL_PER_CLASS, make_photo_patches
from config import parse_config
from dataset_paths import check_layout
from model import resnet50
from recipes import INSTANCE_PRICES, RECIPES, STEP_MILESTONES, WeightAverage, learning_rate, parameter_groups, peak_lr

PEAK, DIV, FINAL_DIV = 0.8, 25.0, 1e4


def torch_lrs(scheduler_factory, total):
    """The LR before each step of a torch scheduler, as train.py's pure functions report it."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=PEAK)
    sched = scheduler_factory(opt)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("total, warmup", [(100, 10), (37, 5), (50, 0)])
def test_linear_and_cosine_equal_torch_warmup_then_decay(total, warmup):
    end = PEAK / DIV / FINAL_DIV
    S = torch.optim.lr_scheduler

    def with_warmup(decay):
        def factory(opt):
            if not warmup:
                return decay(opt)
            return S.SequentialLR(opt, [S.LinearLR(opt, 1 / DIV, 1.0, total_iters=warmup), decay(opt)], [warmup])
        return factory

    decay_steps = total - 1 - warmup
    expected = {
        "linear": torch_lrs(with_warmup(lambda o: S.LinearLR(o, 1.0, end / PEAK, total_iters=decay_steps)), total),
        "cosine": torch_lrs(with_warmup(lambda o: S.CosineAnnealingLR(o, T_max=decay_steps, eta_min=end)), total),
    }
    for schedule, lrs in expected.items():
        ours = [learning_rate(schedule, s, total, warmup, PEAK, 0.3, DIV, FINAL_DIV) for s in range(total)]
        assert ours == pytest.approx(lrs, rel=1e-9, abs=1e-12), schedule
        assert ours[warmup] == pytest.approx(PEAK) and ours[-1] == pytest.approx(end)


def test_step_schedule_divides_by_ten_at_its_milestones_after_warmup():
    total, warmup = 900, 30
    lrs = [learning_rate("step", s, total, warmup, PEAK, 0.3, DIV, FINAL_DIV) for s in range(total)]
    assert lrs[0] == pytest.approx(PEAK / DIV) and lrs[warmup] == pytest.approx(PEAK)
    drops = [s for s in range(1, total) if lrs[s] < lrs[s - 1]]
    assert drops == [round(m * total) for m in STEP_MILESTONES]
    assert lrs[-1] == pytest.approx(PEAK / 1000)


def test_peak_lr_scales_with_the_global_batch_only_when_asked():
    assert peak_lr(0.175, 0, 2048) == 0.175
    assert peak_lr(0.1, 256, 8 * 256) == pytest.approx(0.8)


def test_recipe_presets_then_demo_then_explicit_flags():
    fast = parse_config(["--recipe", "fast"])
    for name, value in RECIPES["fast"].items():
        assert getattr(fast, name) == value, name
    assert parse_config([]).schedule == "onecycle" and parse_config([]).bias_decay is True
    mixed = parse_config(["--recipe", "fast", "--epochs", "16", "--bias-decay", "--no-eval-flip"])
    assert (mixed.epochs, mixed.bias_decay, mixed.eval_flip, mixed.schedule) == (16, True, False, "linear")
    demo = parse_config(["--recipe", "fast", "--demo"])
    assert (demo.image_size, demo.start_image_size, demo.eval_image_size, demo.lr, demo.lr_reference_batch) == \
        (32, 0, 0, 0.2, 0)
    assert demo.label_smoothing == 0.1 and demo.schedule == "linear" and demo.eval_flip
    assert parse_config(["--instance-type", "g5.xlarge"]).usd_per_hour == INSTANCE_PRICES["g5.xlarge"][0]
    assert parse_config(["--instance-type", "g5.xlarge", "--usd-per-hour", "0.4"]).usd_per_hour == 0.4


def test_the_fast_recipes_label_smoothing_is_in_the_loss_a_step_minimizes():
    """The loss train_step returns (and backpropagates) against cross-entropy with smoothed targets, written
    out: (1 - eps) on the label plus eps spread evenly over all K classes."""
    from engine import build_model, build_training, train_step
    from runtime import Runtime

    cfg = parse_config(["--recipe", "fast", "--arch", "resnet14_tiny", "--device", "cpu"])
    eps, classes = cfg.label_smoothing, 10
    assert eps == 0.1
    training = build_training(build_model(cfg, classes), cfg, Runtime())
    x, labels = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.arange(16) % classes
    loss, logits = train_step(training, x, labels, lr=0.0, step=0)
    log_p = logits.double().log_softmax(dim=1)
    targets = torch.full((16, classes), eps / classes, dtype=torch.float64)
    targets[torch.arange(16), labels] += 1 - eps
    smoothed = -(targets * log_p).sum(dim=1).mean()
    plain = -log_p[torch.arange(16), labels].mean()
    assert loss.item() == pytest.approx(smoothed.item(), rel=1e-5)
    assert loss.item() != pytest.approx(plain.item(), rel=1e-3)  # near-uniform logits still tell the two apart


@pytest.mark.parametrize("flags, message", [
    (["--warmup-epochs", "50"], "--warmup-epochs"),
    (["--ema-decay", "1"], "--ema-decay"),
    (["--recipe", "fast", "--image-size", "128"], "--start-image-size"),
    (["--schedule", "exponential"], "--schedule"),
])
def test_bad_recipe_flags_are_refused_with_a_message(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(flags)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_weight_decay_skips_biases_and_batchnorm_by_shape():
    model = resnet50()
    matrices, vectors = parameter_groups(model, 1e-4, bias_decay=False)
    bn = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(matrices["params"]) == 53 + 1  # 53 convolutions and the fc matrix
    assert len(vectors["params"]) == 2 * len(bn) + 1  # BatchNorm scale and shift, and the fc bias
    assert sum(p.numel() for g in (matrices, vectors) for p in g["params"]) == 25_557_032
    assert vectors["weight_decay"] == 0 and matrices["weight_decay"] == 1e-4
    assert parameter_groups(model, 1e-4, bias_decay=True)[1]["weight_decay"] == 1e-4

    # One SGD step with zero gradients: only decay moves the weights, and only the decayed ones move.
    optimizer = torch.optim.SGD([matrices, vectors], lr=1.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, p in model.named_parameters():
        moved = not torch.equal(p, before[name])
        assert moved == (p.ndim > 1 and before[name].abs().sum() > 0), name


def test_weight_average_follows_its_formula_and_copies_counters():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    average = WeightAverage(model, decay=0.9)
    start = {k: v.clone() for k, v in average.model.state_dict().items()}
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model(torch.randn(8, 3))  # moves the BatchNorm statistics and its counter
    average.update(step=100)
    current = model.state_dict()
    for name, value in average.model.state_dict().items():
        if value.is_floating_point():
            expected = 0.9 * start[name] + 0.1 * current[name]
            assert torch.allclose(value, expected, atol=1e-6), name
        else:
            assert torch.equal(value, current[name]), name
    fresh = WeightAverage(model, decay=0.9999)
    fresh.update(step=0)  # decay ramps from 1/10: the first average is mostly the current weights
    assert torch.allclose(fresh.model[0].weight, model[0].weight)


def test_photo_patches_dataset_is_a_complete_imagenet_style_layout(tmp_path):
    root = make_photo_patches(tmp_path / "patches")
    layout = check_layout(root)
    assert layout.classes == sorted(PHOTOS)
    for name in PHOTOS:
        assert len(list((root / "train" / name).iterdir())) == TRAIN_PER_CLASS
        assert len(list((root / "val" / name).iterdir())) == VAL_PER_CLASS
    assert make_photo_patches(root) == root  # a finished dataset is reused, not rewritten


def test_poly_schedule_is_mlperfs_power_2_decay_after_the_warmup():
    """MLPerf's ResNet-50 LARS schedule: end + (peak - end) * (1 - progress) ** 2 after a linear warm-up."""
    total, warmup, end = 102, 21, PEAK / DIV / FINAL_DIV
    lrs = [learning_rate("poly", s, total, warmup, PEAK, 0.3, DIV, FINAL_DIV) for s in range(total)]
    assert lrs[0] == pytest.approx(PEAK / DIV) and lrs[warmup] == pytest.approx(PEAK) and lrs[-1] == pytest.approx(end)
    assert lrs[61] == pytest.approx(end + (PEAK - end) * 0.5 ** 2)  # halfway through the decay: a quarter
    assert all(a > b for a, b in zip(lrs[warmup:], lrs[warmup + 1:], strict=False))


def test_lars_recipe_is_mlperfs_large_batch_recipe():
    cfg = parse_config(["--recipe", "lars"])
    assert (cfg.optimizer, cfg.lr, cfg.lr_reference_batch, cfg.lr_scaling) == ("lars", 11.0, 3200, "sqrt")
    assert (cfg.schedule, cfg.warmup_epochs, cfg.epochs, cfg.weight_decay, cfg.label_smoothing, cfg.bias_decay) == \
        ("poly", 2.0, 37, 5e-5, 0.1, False)
    # The MLPerf end LR of 1e-4, and a warm-up that starts from about zero.
    assert cfg.lr / cfg.div_factor / cfg.final_div_factor == pytest.approx(1e-4)
    assert cfg.lr / cfg.div_factor < 1e-3
    assert peak_lr(cfg.lr, cfg.lr_reference_batch, 8 * 400, cfg.lr_scaling) == 11.0
    assert parse_config(["--recipe", "lars", "--optimizer", "sgd"]).lr == 0.175  # SGD brings its own LR
