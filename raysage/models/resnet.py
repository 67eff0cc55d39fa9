"""ResNet-18 split after layer2, as in the FSL-SAGE paper.

The ImageNet stem (7x7 stride-2 conv, stride-2 max pool) is kept even on
32x32 inputs because the paper's byte counts and the 128x4x4 cut shape
depend on it.
"""

from torch import nn

from raysage.models.layers import MaxPool2d


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        # The identity cannot be added when the block changes resolution or
        # width, so it is projected with a 1x1 conv instead.
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def resnet_layer(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """Two basic blocks; only the first may downsample."""
    return nn.Sequential(
        BasicBlock(in_channels, out_channels, stride),
        BasicBlock(out_channels, out_channels, 1),
    )


def init_weights(module: nn.Module) -> nn.Module:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return module


def resnet18_client() -> nn.Module:
    """x_c: stem + layer1 + layer2; 3x32x32 -> smashed 128x4x4."""
    return init_weights(nn.Sequential(
        nn.Conv2d(3, 64, 7, 2, 3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        MaxPool2d(3, 2, 1),
        resnet_layer(64, 64, 1),
        resnet_layer(64, 128, 2),
    ))


def resnet18_server(num_classes: int) -> nn.Module:
    """x_s: layer3 + layer4 + pooled linear head; 128x4x4 -> logits."""
    return init_weights(nn.Sequential(
        resnet_layer(128, 256, 2),
        resnet_layer(256, 512, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(512, num_classes),
    ))


def resnet18_aux(num_classes: int) -> nn.Module:
    """x_a: one fresh layer3 + pooled linear head, about a fifth of x_s."""
    return init_weights(nn.Sequential(
        resnet_layer(128, 256, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(256, num_classes),
    ))
