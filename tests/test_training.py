"""The training skeleton's optimizer: fused AdamW where torch has it, the same update as the default."""

import pytest
import torch
from torch import nn

from defectforge import training


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    # no BatchNorm after a biased conv: that bias has a zero gradient, and Adam would follow its rounding noise
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.GELU(), nn.Flatten(), nn.LayerNorm(8 * 6 * 6), nn.Linear(8 * 6 * 6, 4))


def _groups(net: nn.Module) -> list[dict]:
    params = list(net.parameters())
    return [{"params": [p for p in params if p.ndim > 1], "weight_decay": 0.05, "lr": 1e-3},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "lr": 5e-4}]


def _train(net: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 4) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(2, 3, 8, 8, generator=gen)
        net(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@pytest.mark.skipif(tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 4),
                    reason="fused AdamW on the CPU needs torch 2.4")
def test_adamw_is_fused_on_cpu_with_the_default_update():
    fused_net, plain_net = _net(0), _net(0)
    fused = training.adamw(iter(_groups(fused_net)), 1e-3)  # any iterable of groups
    plain = torch.optim.AdamW(_groups(plain_net), lr=1e-3)
    assert fused.defaults["fused"] is True and not plain.defaults["fused"]
    assert [g["lr"] for g in fused.param_groups] == [1e-3, 5e-4]
    before = [p.detach().clone() for p in fused_net.parameters()]
    _train(fused_net, fused)
    _train(plain_net, plain)
    for a, b, start in zip(fused_net.parameters(), plain_net.parameters(), before, strict=True):
        assert not torch.equal(a, start)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_adamw_falls_back_where_the_fused_kernel_is_refused(monkeypatch):
    real = torch.optim.AdamW

    class NoFused(real):
        def __init__(self, params, *args, fused=None, **kwargs):
            if fused:
                raise RuntimeError("`fused=True` requires all the params to be on a supported device")
            super().__init__(params, *args, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", NoFused)
    net = _net(0)
    before = [p.detach().clone() for p in net.parameters()]
    optimizer = training.adamw((g for g in _groups(net)), 1e-3)  # a generator is not consumed by the failed try
    assert isinstance(optimizer, NoFused) and not optimizer.defaults["fused"]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(before)
    _train(net, optimizer)
    assert all(not torch.equal(a, b) for a, b in zip(net.parameters(), before, strict=True))
