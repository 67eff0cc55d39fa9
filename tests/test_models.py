import pytest
import torch
from torch import nn

from raysage.errors import ModelError
from raysage.models import (
    MODELS,
    SplitArchitecture,
    get_architecture,
    num_parameters,
    state_bytes,
    summarize,
)


# The FSL-SAGE paper's ResNet-18 split; any drift here changes every
# communication-cost number we report.
RESNET18_BYTES_10 = {
    "client": 2_740_048,
    "server": 42_025_080,
    "aux": 8_419_408,
    "full": 44_765_128,
}


@pytest.fixture(scope="module")
def resnet18_10():
    torch.manual_seed(0)
    return summarize(get_architecture("resnet18", 10))


def test_resnet18_state_bytes_match_paper(resnet18_10):
    for part, expected in RESNET18_BYTES_10.items():
        assert resnet18_10[part]["state_bytes"] == expected, part
    assert resnet18_10["cut_shape"] == (128, 4, 4)
    assert resnet18_10["smashed_bytes_per_sample"] == 8192
    # The full model is exactly x_c followed by x_s.
    assert resnet18_10["full"]["state_bytes"] == (
        resnet18_10["client"]["state_bytes"] + resnet18_10["server"]["state_bytes"]
    )


def test_resnet18_num_classes_changes_only_linear_heads(resnet18_10):
    torch.manual_seed(0)
    s100 = summarize(get_architecture("resnet18", 100))
    assert s100["client"] == resnet18_10["client"]
    # 90 extra output rows, each with its input weights and one bias, fp32.
    assert s100["server"]["state_bytes"] - resnet18_10["server"]["state_bytes"] == (512 + 1) * 90 * 4
    assert s100["aux"]["state_bytes"] - resnet18_10["aux"]["state_bytes"] == (256 + 1) * 90 * 4
    assert s100["server"]["params"] - resnet18_10["server"]["params"] == (512 + 1) * 90


@pytest.mark.parametrize("name,batch", [("cnn", 4), ("resnet18", 2), ("simple_conv", 3)])
def test_split_shapes_and_full_model_composition(name, batch):
    torch.manual_seed(0)
    arch = get_architecture(name, 7)
    assert isinstance(arch, SplitArchitecture)
    assert arch.name == name and arch.num_classes == 7
    x_c, x_s, x_a = arch.make_client(), arch.make_server(), arch.make_aux()
    full = arch.make_full()
    for m in (x_c, x_s, x_a, full):
        m.eval()  # BatchNorm running stats instead of batch stats

    x = torch.randn(batch, *arch.input_shape)
    with torch.no_grad():
        h = x_c(x)
        assert h.shape == (batch,) + tuple(arch.cut_shape)
        assert x_s(h).shape == (batch, 7)
        assert x_a(h).shape == (batch, 7)

        full[0].load_state_dict(x_c.state_dict())
        full[1].load_state_dict(x_s.state_dict())
        assert torch.equal(full(x), x_s(h))
        # And the parts' state dicts are exactly the full one under "0."/"1.".
        merged = {f"0.{k}": v for k, v in x_c.state_dict().items()}
        merged.update({f"1.{k}": v for k, v in x_s.state_dict().items()})
        full.load_state_dict(merged)
        assert torch.equal(full(x), x_s(h))


def test_factories_return_fresh_modules():
    arch = get_architecture("cnn", 10)
    a, b = arch.make_client(), arch.make_client()
    assert a is not b
    assert not torch.equal(a[0].weight, b[0].weight)
    # Seeding is the caller's job and must make construction reproducible.
    torch.manual_seed(3)
    c = arch.make_aux()
    torch.manual_seed(3)
    d = arch.make_aux()
    for p, q in zip(c.parameters(), d.parameters()):
        assert torch.equal(p, q)


def test_cnn_is_small():
    s = summarize(get_architecture("cnn", 10))
    assert s["smashed_bytes_per_sample"] <= 8192
    assert s["aux"]["state_bytes"] < s["server"]["state_bytes"] / 5
    # No BatchNorm, so the state is parameters only.
    assert s["full"]["state_bytes"] == s["full"]["params"] * 4


def test_state_bytes_hand_made_modules():
    assert state_bytes(nn.Linear(3, 2)) == (6 + 2) * 4
    # weight, bias, running_mean, running_var in fp32 + int64 num_batches_tracked.
    assert state_bytes(nn.BatchNorm1d(4)) == 4 * 4 * 4 + 8
    assert state_bytes(nn.Linear(3, 2).half()) == (6 + 2) * 2
    assert state_bytes(nn.BatchNorm1d(4).state_dict()) == 72
    assert state_bytes({}) == 0


def test_num_parameters():
    assert num_parameters(nn.Linear(3, 2)) == 8
    # Buffers are not parameters.
    assert num_parameters(nn.BatchNorm1d(4)) == 8


def test_models_dict():
    assert set(MODELS) == {"cnn", "resnet18", "simple_conv", "gpt2"}
    assert MODELS["cnn"](10) == get_architecture("cnn", 10)


def test_unknown_model_name():
    with pytest.raises(ModelError) as e:
        get_architecture("nope", 10)
    msg = str(e.value)
    assert "nope" in msg and "cnn" in msg and "resnet18" in msg and "simple_conv" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("bad", [1, 0, -3, 2.5, True, "10"])
def test_bad_num_classes(bad):
    with pytest.raises(ModelError) as e:
        get_architecture("cnn", bad)
    assert repr(bad) in str(e.value)


@pytest.mark.parametrize("kernel,stride,padding,side", [(2, 2, 0, 8), (2, 2, 0, 16), (3, 2, 1, 9),
                                                        (3, 2, 1, 16), (3, 2, 1, 20)])
def test_the_zoo_max_pool_gives_the_same_bits_as_torch_s_including_ties_and_nan(kernel, stride,
                                                                                padding, side):
    """Small planes take the channels-last kernel (side 20 does not): its output, and the
    gradient it routes back, equal nn.MaxPool2d's to the bit, on integer-valued input whose
    windows tie, with NaNs (which win a window) and a tie of two NaNs in one."""
    from raysage.models.layers import MaxPool2d

    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        x = torch.randint(0, 3, (3, 4, side, side), generator=g).float()
        if seed % 2:
            x[0, 0, 2, 3] = x[1, 2, 4, 4] = x[1, 2, 4, 5] = float("nan")
        ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
        a = MaxPool2d(kernel, stride, padding)(ours)
        b = nn.MaxPool2d(kernel, stride, padding)(theirs)
        assert a.is_contiguous() and a.shape == b.shape
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
        weights = torch.randn(a.shape, generator=g)
        (a.nan_to_num() * weights).sum().backward()
        (b.nan_to_num() * weights).sum().backward()
        assert torch.equal(ours.grad, theirs.grad)
        assert int((ours.grad != 0).sum()) > 0
