"""ResNet-50 v1.5 and smaller siblings from the same code.

The parameter and buffer names and shapes match torchvision.models.resnet50, so a state_dict moves between
the two in either direction. v1.5 means the stride-2 of a downsampling bottleneck sits on the 3x3
convolution, not the first 1x1 (about +0.5% top-1 over v1 for a little more compute).
A channel-pruned network (prune.py) keeps the names with fewer channels; narrowed_to rebuilds it from
its state_dict.
"""

import torch
from torch import nn


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1):
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, blocks_per_stage: list[int], num_classes: int = 1000, base_width: int = 64,
                 zero_init_residual: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, base_width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_channels = base_width
        for stage, num_blocks in enumerate(blocks_per_stage):
            width = base_width * 2**stage
            stride = 1 if stage == 0 else 2
            blocks = []
            for i in range(num_blocks):
                blocks.append(Bottleneck(in_channels, width, stride if i == 0 else 1))
                in_channels = width * Bottleneck.expansion
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            # Each residual branch starts as zero, so every block is the identity at step 0: the network
            # trains like a shallower one early on, which makes large learning rates stable.
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet50(num_classes: int = 1000, zero_init_residual: bool = True) -> ResNet:
    """ResNet-50 v1.5: 25,557,032 parameters at 1000 classes."""
    return ResNet([3, 4, 6, 3], num_classes, 64, zero_init_residual)


def resnet26_narrow(num_classes: int = 1000, zero_init_residual: bool = True) -> ResNet:
    """ResNet-50's code with two blocks per stage at a quarter of the width: for quick CPU runs and tests."""
    return ResNet([2, 2, 2, 2], num_classes, 16, zero_init_residual)


def resnet14_tiny(num_classes: int = 1000, zero_init_residual: bool = True) -> ResNet:
    """One block per stage at an eighth of the width: the smallest network that exercises every code path."""
    return ResNet([1, 1, 1, 1], num_classes, 8, zero_init_residual)


# Every network here downsamples by 32 in all. A smaller crop leaves the last stages convolving padding
# around a single position: it runs, but learns nothing an ImageNet model should.
MIN_IMAGE_SIZE = 32

ARCHITECTURES = {"resnet50": resnet50, "resnet26_narrow": resnet26_narrow, "resnet14_tiny": resnet14_tiny}


def narrowed_to(model: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    """model with each convolution, BatchNorm and the classifier's input resized to the shapes in weights: how a
    channel-pruned network (prune.py) is rebuilt from its state_dict alone, so that its file holds tensors and
    no pickled module. Kernel sizes, strides and the layer structure stay the architecture's; the classifier keeps
    its outputs (one per class). The new layers are freshly initialised: load weights into them next."""
    for name, module in list(model.named_modules()):
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if isinstance(module, nn.Conv2d):
            out_channels, in_channels = weights[f"{name}.weight"].shape[:2]
            if (out_channels, in_channels) != (module.out_channels, module.in_channels):
                setattr(parent, attribute, nn.Conv2d(in_channels, out_channels, module.kernel_size, module.stride,
                                                     module.padding, bias=module.bias is not None))
        elif isinstance(module, nn.BatchNorm2d):
            features = weights[f"{name}.weight"].shape[0]
            if features != module.num_features:
                setattr(parent, attribute, nn.BatchNorm2d(features))
        elif isinstance(module, nn.Linear):
            in_features = weights[f"{name}.weight"].shape[1]
            if in_features != module.in_features:
                setattr(parent, attribute, nn.Linear(in_features, module.out_features))
    return model
