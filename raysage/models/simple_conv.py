"""The FSL-SAGE reference code's small CIFAR split (``simple_conv``).

The FSL-SAGE authors' official code (Nair et al., ICML 2025, arXiv
2505.23182) runs its quick CIFAR experiments, and its reference curves on
the CIFAR-10 subset, on this model; ``../shared/algorithms.md`` ("Reference
configuration (CIFAR-10, simple_conv)") restates it. It is rebuilt here
layer for layer, because comparing raysage with the reference is only
meaningful on the same model: the same cut, the same parameter count (so
the same bytes per model transfer) and the same initial weight scale (so
the same early training dynamics).

Choices, and why:

- The layer sequence is the classic two-convolution CIFAR network (5x5
  convolutions, 3x3 stride-2 overlapping max pools, local response
  normalisation) the reference uses. Its first block pools before it
  normalises and its second normalises before it pools; that asymmetry is
  the reference's, and is kept because the two orders give different
  activations.
- LocalResponseNorm takes size 4, alpha 0.001 / 9, beta 0.75, k 1: the
  reference's arguments to ``torch.nn.LocalResponseNorm``, passed unchanged
  (PyTorch divides alpha by size internally, so translating from another
  framework's convention would change the layer).
- The cut is after the second pool, flattened: 64 x 8 x 8 = 4,096 fp32
  values, 16,384 bytes a sample. Flattening on the client makes the smashed
  shape the server's input shape, so x_s and x_a are plain linear layers.
- x_c keeps PyTorch's default initialisation, as the reference does.
- x_s (4096 -> 384 -> 192 -> classes, ReLU between) and x_a (one linear
  layer) draw weights *and* biases from N(0, 0.05), 0.05 being the
  standard deviation, as the reference's ``normal_(0, 0.05)``. PyTorch's
  default for the 4,096-wide input layer is uniform within 1/64 (standard
  deviation 0.009), more than five times smaller, so keeping the default
  would start from a different point.
- No BatchNorm anywhere: the state is parameters only, and every byte count
  is 4 x the parameter count.
"""

from torch import nn

from raysage.models.layers import MaxPool2d

CUT_CHANNELS, CUT_SIDE = 64, 8
CUT_FEATURES = CUT_CHANNELS * CUT_SIDE * CUT_SIDE  # 4,096 values per sample
INIT_STD = 0.05


def response_norm() -> nn.LocalResponseNorm:
    return nn.LocalResponseNorm(4, alpha=0.001 / 9.0, beta=0.75, k=1.0)


def normal_init(module: nn.Module, std: float = INIT_STD) -> nn.Module:
    """Every Linear's weight and bias from N(0, std), overwriting PyTorch's default."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, std)
            nn.init.normal_(m.bias, 0.0, std)
    return module


def simple_conv_client() -> nn.Module:
    """x_c: 3x32x32 -> smashed 4,096 values (64 channels of 8x8, flattened)."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 5, padding=2),          # 32x32
        nn.ReLU(),
        MaxPool2d(3, stride=2, padding=1),    # 16x16
        response_norm(),
        nn.Conv2d(64, 64, 5, padding=2),         # 16x16
        nn.ReLU(),
        response_norm(),
        MaxPool2d(3, stride=2, padding=1),    # 8x8
        nn.Flatten(),
    )


def simple_conv_server(num_classes: int) -> nn.Module:
    """x_s: 4,096 -> 384 -> 192 -> logits."""
    return normal_init(nn.Sequential(
        nn.Linear(CUT_FEATURES, 384),
        nn.ReLU(),
        nn.Linear(384, 192),
        nn.ReLU(),
        nn.Linear(192, num_classes),
    ))


def simple_conv_aux(num_classes: int) -> nn.Module:
    """x_a: one linear layer from the smashed data to logits (40,970 parameters for 10 classes)."""
    return normal_init(nn.Linear(CUT_FEATURES, num_classes))
