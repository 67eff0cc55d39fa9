"""Max pooling in the zoo's models: torch's NCHW kernel against the zoo's ``MaxPool2d``.

For each pooling shape the zoo's models meet (``cnn`` at batch 20,
``simple_conv`` at 20 and 128, ResNet-18's stem), it prints the time of a
forward and backward pass through ``nn.MaxPool2d`` and through
``raysage.models.layers.MaxPool2d``, on one torch thread, and then the time
of a whole ``cnn`` training step (batch 20, SGD) with each, checking that the
weights after the steps are the same bits.

    .venv/bin/python benchmarks/bench_pool.py
"""

from __future__ import annotations

import time

import torch
from torch import nn

from raysage.models import cnn
from raysage.models.layers import MaxPool2d

SHAPES = [  # (batch, channels, side), kernel, stride, padding, model
    ((20, 32, 16, 16), 2, 2, 0, "cnn client, batch 20"),
    ((20, 64, 8, 8), 2, 2, 0, "cnn server, batch 20"),
    ((20, 64, 32, 32), 3, 2, 1, "simple_conv pool 1, batch 20"),
    ((20, 64, 16, 16), 3, 2, 1, "simple_conv pool 2, batch 20"),
    ((128, 64, 32, 32), 3, 2, 1, "simple_conv pool 1, batch 128"),
    ((128, 64, 16, 16), 3, 2, 1, "simple_conv pool 2, batch 128"),
    ((64, 64, 16, 16), 3, 2, 1, "resnet18 stem, batch 64"),
]


def per_call_ms(fn, repeat: int) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat * 1e3


def pool_pass(pool: nn.Module, x: torch.Tensor):
    def run():
        leaf = x.clone().requires_grad_()
        pool(leaf).sum().backward()
    return run


def cnn_steps(pool_cls, steps: int):
    """ms per cnn training step with pool_cls in place of the zoo's pooling, and the weights."""
    torch.manual_seed(0)
    client, server = cnn.cnn_client(), cnn.cnn_server(10)
    for model in (client, server):
        for i, m in enumerate(model):
            if isinstance(m, nn.MaxPool2d):
                model[i] = pool_cls(m.kernel_size, m.stride, m.padding)
    params = list(client.parameters()) + list(server.parameters())
    opt = torch.optim.SGD(params, lr=0.05)
    x, y = torch.randn(20, 3, 32, 32), torch.randint(0, 10, (20,))

    def step():
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(server(client(x)), y).backward()
        opt.step()
    ms = per_call_ms(step, steps)
    return ms, torch.cat([p.detach().flatten() for p in params])


def main() -> None:
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          "1 thread; forward + backward per call")
    print(f"{'shape':>20} {'k/s/p':>6}  {'nn.MaxPool2d':>12} {'zoo MaxPool2d':>13}  where")
    for shape, k, s, p, where in SHAPES:
        x = torch.randn(shape)
        repeat = max(5, int(2e7 / x.numel()))
        plain = per_call_ms(pool_pass(nn.MaxPool2d(k, s, p), x), repeat)
        zoo = per_call_ms(pool_pass(MaxPool2d(k, s, p), x), repeat)
        print(f"{'x'.join(map(str, shape)):>20} {k}/{s}/{p:<2}  {plain:9.3f} ms {zoo:10.3f} ms  {where}")
    plain, w_plain = cnn_steps(nn.MaxPool2d, 300)
    zoo, w_zoo = cnn_steps(MaxPool2d, 300)
    print(f"cnn training step (batch 20): nn.MaxPool2d {plain:.2f} ms, zoo MaxPool2d {zoo:.2f} ms "
          f"({(1 - zoo / plain) * 100:.0f}% less); weights after 303 steps identical: "
          f"{bool(torch.equal(w_plain, w_zoo))}")


if __name__ == "__main__":
    main()
