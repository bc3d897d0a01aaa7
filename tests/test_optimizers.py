"""--optimizer: what each update rule does to the two parameter groups, the published defaults, the refusals, and
real runs on the digits that learn and resume bit for bit after a kill."""

import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch
from conftest import run_train, train_cmd
from test_resume import final_state, metrics

import lr_finder
from checkpoint import load_latest_checkpoint
from config import DEMO_LRS, Config, UsageError, parse_config, resumed_config
from engine import build_optimizer
from model import ARCHITECTURES
from recipes import OPTIMIZER_DEFAULTS, RECIPES, peak_lr


def tiny_model_with_gradients(seed=0):
    torch.manual_seed(seed)
    model = ARCHITECTURES["resnet14_tiny"](num_classes=10)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    return model


def one_step(optimizer_name, **settings):
    """(model, parameters before, gradients) after one step of --optimizer on random gradients."""
    model = tiny_model_with_gradients()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    cfg = replace(Config(), optimizer=optimizer_name, **settings)
    build_optimizer(model, cfg).step()
    return model, before, grads


@pytest.mark.parametrize("bias_decay", [True, False])
def test_lars_rescales_and_decays_only_the_weights_never_batchnorm_nor_biases(bias_decay):
    """A --bias-decay that reached the optimizer would give the 1-D group a non-zero decay, and timm's Lars would
    then decay it and rescale its step by a trust ratio: the 1-D group must stay at zero whatever it says."""
    lr, decay = 2.0, 1e-2
    model, before, grads = one_step("lars", lr=lr, weight_decay=decay, bias_decay=bias_decay)
    for name, p in model.named_parameters():
        w, g = before[name], grads[name]
        if p.ndim <= 1:  # the first momentum step is the gradient itself: plain SGD
            torch.testing.assert_close(p.detach(), w - lr * g, rtol=0, atol=1e-6, msg=name)
        else:
            trust = 0.001 * w.norm() / (g.norm() + decay * w.norm() + 1e-8)
            torch.testing.assert_close(p.detach(), w - lr * trust * (g + decay * w), msg=name)


def test_lars_adapts_the_weights_even_without_weight_decay():
    """timm's Lars skips the trust ratio of a group without decay unless told always_adapt: --weight-decay 0 must
    not turn LARS at its LR of 11 into plain SGD."""
    model, before, grads = one_step("lars", lr=3.0, weight_decay=0.0)
    conv = next(n for n, p in model.named_parameters() if p.ndim == 4)
    w, g = before[conv], grads[conv]
    torch.testing.assert_close(dict(model.named_parameters())[conv].detach(), w - 3.0 * 0.001 * w.norm() / g.norm() * g)


def test_lamb_scales_each_weight_step_to_its_norm_and_leaves_1d_steps_unscaled():
    lr = 0.01
    model, before, grads = one_step("lamb", lr=lr, weight_decay=0.02, bias_decay=True)
    clip = max(1.0, torch.stack([g.norm() for g in grads.values()]).norm().item())  # the global norm to 1.0
    for name, p in model.named_parameters():
        step = p.detach() - before[name]
        if p.ndim <= 1:  # Adam's bias-corrected first step, -lr * g / (|g| + eps), no trust ratio, no decay
            g = grads[name] / clip
            torch.testing.assert_close(step, -lr * g / (g.abs() + 1e-6), msg=name)
        else:  # the trust ratio ||w|| / ||update|| makes the step lr * ||w|| long
            assert step.norm().item() == pytest.approx(lr * before[name].norm().item(), rel=1e-4), name


def test_adamw_decay_is_decoupled_from_the_adam_step():
    """With zero gradients Adam's step is zero: only the decoupled decay moves the weights, by lr * decay * w.
    Decay added to the gradient (Adam's L2) would instead move them by about lr in every element."""
    model = tiny_model_with_gradients()
    for p in model.parameters():
        p.grad.zero_()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lr, decay = 0.01, 0.05
    build_optimizer(model, replace(Config(), optimizer="adamw", lr=lr, weight_decay=decay, bias_decay=False)).step()
    for name, p in model.named_parameters():
        expected = before[name] * (1 - lr * decay) if p.ndim > 1 else before[name]
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-7, msg=name)


def test_each_optimizer_brings_its_published_defaults_unless_the_recipe_is_its_own():
    assert parse_config([]) == parse_config(["--optimizer", "sgd"])  # SGD: the defaults as they always were
    for name, defaults in OPTIMIZER_DEFAULTS.items():
        cfg = parse_config(["--optimizer", name])
        assert {k: getattr(cfg, k) for k in defaults} == defaults
        assert parse_config(["--optimizer", name, "--demo"]).lr == DEMO_LRS[name]
    fast_lamb = parse_config(["--recipe", "fast", "--optimizer", "lamb", "--weight-decay", "0.01"])
    assert (fast_lamb.lr, fast_lamb.weight_decay, fast_lamb.schedule) == (8e-3, 0.01, RECIPES["fast"]["schedule"])
    assert parse_config(["--recipe", "fast"]).lr == RECIPES["fast"]["lr"]
    # The published LAMB LR belongs to 2,048 images; a quarter of that batch takes half of it.
    assert peak_lr(8e-3, 2048, 512, "sqrt") == pytest.approx(4e-3)
    assert peak_lr(0.1, 256, 512, "linear") == pytest.approx(0.2)


@pytest.mark.parametrize("flags, message", [
    (["--optimizer", "rmsprop"], "--optimizer"),
    (["--optimizer", "lars", "--bias-decay"], "--bias-decay does not apply to --optimizer lars"),
])
def test_optimizer_misuse_is_refused(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(flags)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_lars_without_timm_is_refused_with_the_command_that_installs_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm.optim", None)  # what an absent package looks like to import
    with pytest.raises(UsageError, match="pip install 'timm>=1.0,<2'.*--optimizer sgd or adamw"):
        build_optimizer(tiny_model_with_gradients(), replace(Config(), optimizer="lars", bias_decay=False))
    build_optimizer(tiny_model_with_gradients(), replace(Config(), optimizer="adamw"))  # torch alone


def test_resuming_with_another_optimizer_is_refused_and_old_checkpoints_are_sgd_runs():
    saved = {k: v for k, v in vars(Config()).items() if k not in ("optimizer", "lr_scaling")}  # before --optimizer
    assert resumed_config(Config(), saved, set()).optimizer == "sgd"
    with pytest.raises(UsageError, match="--init-from .*--no-resume") as refusal:
        resumed_config(parse_config(["--optimizer", "lamb"]), saved, {"optimizer"})
    assert "trained with --optimizer sgd, not lamb" in str(refusal.value)
    lamb_run = vars(parse_config(["--optimizer", "lamb"]))
    resumed = resumed_config(Config(), lamb_run, set())  # a bare rerun continues the LAMB run as it was
    assert (resumed.optimizer, resumed.lr, resumed.weight_decay) == ("lamb", 8e-3, 0.02)
    with pytest.raises(UsageError, match="not lars"):
        resumed_config(parse_config(["--recipe", "fast", "--optimizer", "lars"]), lamb_run, {"recipe", "optimizer"})


def test_lr_finder_sweeps_the_optimizer_the_run_will_use(digits_dir, tmp_path):
    cfg, sweep, explicit = lr_finder.parse_args(["--demo", "--data-dir", str(digits_dir), "--arch", "resnet14_tiny",
                                                 "--optimizer", "lamb", "--num_iter", "2", "--workers", "0",
                                                 "--device", "cpu"])
    curve = lr_finder.run_sweep(cfg, sweep, [f"digit_{i}" for i in range(10)], torch.device("cpu"))
    assert curve["optimizer"] == "Lamb" and len(curve["loss"]) == 2
    assert "--optimizer lamb" in lr_finder.train_command(cfg, explicit, 0.01)


# ---------------------------------------------------------------------------------------------------- real runs

# The demo's LR for each optimizer, on the small network at batch 32; a checkpoint at every sync point (every 3
# steps) so a kill lands mid-epoch.
RUN = ["--demo", "--arch", "resnet14_tiny", "--epochs", "2", "--batch-size", "32", "--workers", "1", "--threads",
       "1", "--device", "cpu", "--checkpoint-minutes", "0.0001", "--log-every", "3", "--no-tensorboard"]


@pytest.fixture(scope="module", params=["lars", "lamb", "adamw"])
def uninterrupted_run(request, digits_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"{request.param}_uninterrupted")
    args = ["--data-dir", digits_dir, "--output-dir", out, "--optimizer", request.param, *RUN]
    done = run_train(*args)
    assert done.returncode == 0, done.stderr
    assert f"recipe seed: {request.param}," in done.stdout
    return request.param, out, args


def test_each_optimizer_learns_the_demo_at_its_default_lr(uninterrupted_run):
    name, out, _ = uninterrupted_run
    assert float(metrics(out)[-1]["val_acc1"]) > 35, name  # ten classes: chance is 10%
    assert load_latest_checkpoint(out)["config"]["optimizer"] == name


def test_each_optimizer_resumes_bit_for_bit_after_a_kill_mid_epoch(uninterrupted_run, tmp_path):
    name, reference, args = uninterrupted_run
    args = [tmp_path / "killed" if a == reference else a for a in args]
    out = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while True:  # until a checkpoint lands in the middle of epoch 2
            state = load_latest_checkpoint(out) if (out / "checkpoint.pth").exists() else None
            if state and state["epoch"] == 1 and state["samples_done"] > 0:
                break
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no mid-epoch checkpoint in time"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    done = run_train(*args)
    assert done.returncode == 0 and "Resuming" in done.stdout, done.stderr
    ours, theirs = final_state(out), final_state(reference)
    for key, tensor in theirs["model"].items():
        assert torch.equal(ours["model"][key], tensor), key
    assert ours["optimizer"]["state"].keys() == theirs["optimizer"]["state"].keys()
    for index, state in theirs["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(ours["optimizer"]["state"][index][key]), torch.as_tensor(value))
    assert [g.get("step") for g in ours["optimizer"]["param_groups"]] == \
        [g.get("step") for g in theirs["optimizer"]["param_groups"]]
    assert [r["val_acc1"] for r in metrics(out)] == [r["val_acc1"] for r in metrics(reference)], name
