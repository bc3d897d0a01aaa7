import torch
import torchvision

from model import ARCHITECTURES, resnet50


def test_resnet50_has_the_published_parameter_count():
    assert sum(p.numel() for p in resnet50().parameters()) == 25_557_032


def test_state_dict_matches_torchvision_names_and_shapes():
    ours, theirs = resnet50().state_dict(), torchvision.models.resnet50().state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)


def test_v1_5_puts_the_stride_on_the_3x3_convolution():
    block = resnet50().layer2[0]
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)


def test_zero_init_residual_zeroes_the_last_bn_of_each_branch():
    assert all((b.bn3.weight == 0).all() for layer in (resnet50().layer1, resnet50().layer4) for b in layer)
    assert all((b.bn3.weight == 1).all() for b in resnet50(zero_init_residual=False).layer3)


def test_same_outputs_as_torchvision_with_the_same_weights_both_ways():
    torch.manual_seed(0)
    theirs = torchvision.models.resnet50()
    for m in theirs.modules():  # non-trivial BN statistics, so eval mode is really compared
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    ours = resnet50()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 64, 64)
    for mode in ("eval", "train"):
        getattr(ours, mode)()
        getattr(theirs, mode)()
        with torch.no_grad():
            assert torch.allclose(ours(x), theirs(x), atol=1e-5, rtol=1e-4)
    # The other way: weights of our own initialization, with live residual branches and BN statistics, in theirs.
    mine = resnet50()
    for m in mine.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    back = torchvision.models.resnet50()
    back.load_state_dict(mine.state_dict())
    with torch.no_grad():
        assert torch.allclose(back.eval()(x), mine.eval()(x), atol=1e-5, rtol=1e-4)


def test_small_variants_run_and_are_small():
    for name, net_fn in ARCHITECTURES.items():
        net = net_fn(num_classes=10)
        assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10), name
    assert sum(p.numel() for p in ARCHITECTURES["resnet14_tiny"]().parameters()) < 1_000_000


def test_a_checkpoints_weights_load_into_timm_and_torchvision():
    import timm  # requirements-dev.txt; imported here so the other model tests run without it
    torch.manual_seed(0)
    ours = resnet50(num_classes=10)
    for m in ours.modules():  # non-trivial BN statistics and residual branches, so the comparison means something
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    state = {"model": ours.state_dict()}  # what train.py saves under "model"
    x = torch.randn(2, 3, 64, 64)
    # pretrained=False: the architecture only; nothing is downloaded.
    for other in (timm.create_model("resnet50", num_classes=10, pretrained=False),
                  torchvision.models.resnet50(num_classes=10)):
        other.load_state_dict(state["model"], strict=True)
        with torch.no_grad():
            assert torch.allclose(other.eval()(x), ours.eval()(x), atol=1e-5, rtol=1e-4)
