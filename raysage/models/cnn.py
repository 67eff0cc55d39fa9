"""A small CNN split for fast CPU runs and tests.

No BatchNorm: at batch sizes of a few samples its statistics are noisy, and
without running buffers the client state is parameters only, which keeps
aggregation and determinism simple.

The first layer is a stride-2 convolution rather than conv + pool: at
32x32 the pooling backward cost as much as the convolutions, and this model
runs millions of steps in a 200-client simulation on a laptop. Elsewhere max
pooling comes before ReLU: the two commute (ReLU is monotone), so the output
is the same, but ReLU then runs on a quarter of the elements.
"""

from torch import nn

from raysage.models.layers import MaxPool2d


def cnn_client() -> nn.Module:
    """x_c: 3x32x32 -> smashed 32x8x8 (8 KB per sample in fp32)."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        MaxPool2d(2),
        nn.ReLU(),
    )


def cnn_server(num_classes: int) -> nn.Module:
    """x_s: 32x8x8 -> logits."""
    return nn.Sequential(
        nn.Conv2d(32, 64, 3, padding=1),
        MaxPool2d(2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 128),
        nn.ReLU(),
        nn.Linear(128, num_classes),
    )


def cnn_aux(num_classes: int) -> nn.Module:
    """x_a: one strided conv and a linear head.

    The conv lets x_a see local structure in h, so its gradient with respect
    to h can track the server's; the stride keeps alignment (100 epochs of
    double backward per client) about 8x cheaper than a full-size conv.
    """
    return nn.Sequential(
        nn.Conv2d(32, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, num_classes),
    )
