"""How the models see (evaluate/represent.py): CKA, attention distance, receptive field, rollout, probe, AUROC."""

import math

import numpy as np
import pytest
import torch

from evaluate.represent import (
    MinibatchCKA,
    attention_distance,
    auroc,
    cka,
    gram,
    hsic_unbiased,
    linear_probe,
    receptive_field,
    rollout,
    u_center,
)


def _features(n=256, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64)


def test_u_centred_product_is_the_unbiased_hsic_written_out():
    x, y = _features(20, 7, 1), _features(20, 5, 2)
    k, l = gram(x), gram(y)  # noqa: E741
    fast = float((u_center(k) * u_center(l)).sum() / (20 * 17))
    assert fast == pytest.approx(hsic_unbiased(k, l), rel=1e-9)


def test_cka_of_a_representation_with_itself_is_one_and_invariant_to_rotation_and_scale():
    x = _features()
    q, _ = torch.linalg.qr(_features(64, 64, 3))  # a random orthogonal matrix
    y = x @ torch.randn(64, 32, generator=torch.Generator().manual_seed(4), dtype=torch.float64) + 0.5 * _features(
        256, 32, 5)
    assert cka(x, x) == pytest.approx(1.0, abs=1e-9)
    base = cka(x, y)
    assert 0.2 < base < 0.99
    assert cka(x @ q, y) == pytest.approx(base, abs=1e-9)
    assert cka(3.7 * x, y * 0.01) == pytest.approx(base, abs=1e-9)


def test_cka_of_independent_random_features_is_near_zero():
    assert abs(cka(_features(512, 768, 6), _features(512, 2048, 7), batch=64)) < 0.02


def test_the_minibatch_estimate_agrees_with_the_full_batch_value():
    x = _features(512, 96, 8)
    y = torch.tanh(x[:, :48] @ torch.randn(48, 80, generator=torch.Generator().manual_seed(9), dtype=torch.float64)) \
        + 0.3 * _features(512, 80, 10)
    full, mini = cka(x, y), cka(x, y, batch=64)
    assert 0.1 < full < 0.95 and mini == pytest.approx(full, abs=0.03)


def test_minibatch_cka_gives_every_pair_of_layers_and_refuses_tiny_batches():
    acc = MinibatchCKA()
    x = _features(32, 8, 11)
    acc.update({"a": x, "b": 2 * x, "c": _features(32, 8, 12)})
    m = acc.compute()
    assert m.shape == (3, 3) and np.allclose(np.diag(m), 1) and np.allclose(m, m.T) and m[0, 1] == pytest.approx(1)
    with pytest.raises(ValueError, match="at least 4 examples"):
        acc.update({"a": x[:3], "b": x[:3], "c": x[:3]})


def test_attention_distance_of_local_and_uniform_attention_equals_hand_computed_values():
    # a 2x2 grid of 16 px patches plus a class token; local: each patch attends to itself and its right/left
    # neighbour half-half -> every query's distance is 8 px
    n = 5
    local = torch.zeros(1, 2, n, n)
    for q, k in [(1, 2), (2, 1), (3, 4), (4, 3)]:
        local[0, :, q, q] = 0.4
        local[0, :, q, k] = 0.4
        local[0, :, q, 0] = 0.2  # to the class token: excluded, the patch weights are renormalised
    assert attention_distance(local, (2, 2), 16, prefix=1) == pytest.approx([8.0, 8.0])
    uniform = torch.full((1, 1, 4, 4), 0.25)  # no prefix: each query sees 0, 16, 16, 16*sqrt(2) px
    assert attention_distance(uniform, (2, 2), 16)[0] == pytest.approx((32 + 16 * math.sqrt(2)) / 4)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_receptive_field_of_stacked_3x3_convolutions_matches_the_theoretical_size(k):
    torch.manual_seed(k)
    net = torch.nn.Sequential(*[torch.nn.Conv2d(2 if i else 3, 2, 3, padding=1) for i in range(k)])
    with torch.no_grad():
        for conv in net:
            conv.weight.abs_()  # no cancellation inside the theoretical field
    x = torch.rand(1, 3, 21, 21, requires_grad=True)
    net(x)[0, :, 10, 10].sum().backward()
    erf = receptive_field(x.grad[0].abs().sum(0), share=1.0)
    assert erf["size"] == 2 * k + 1
    assert 0 < erf["mean_distance"] < k * math.sqrt(2)
    assert receptive_field(x.grad[0].abs().sum(0), share=0.5)["size"] <= 2 * k + 1


def test_rollout_of_identity_attention_is_uniform_and_follows_a_pointing_class_token():
    n = 1 + 9
    identity = [torch.eye(n).expand(1, 3, n, n)] * 4
    for fusion in ("mean", "max", "min"):
        r = rollout(identity, prefix=1, fusion=fusion, discard_ratio=0.5)
        assert r.shape == (1, 9) and torch.allclose(r, r[:, :1].expand_as(r))
    r = rollout([torch.eye(9).expand(1, 2, 9, 9)], prefix=0)  # no class token: the mean over patch queries
    assert torch.allclose(r, torch.full((1, 9), 1 / 9))
    pointing = torch.eye(n).expand(1, 2, n, n).clone()
    pointing[0, :, 0] = 0
    pointing[0, :, 0, 5] = 1  # the class token looks at patch 4
    assert int(rollout([pointing, torch.eye(n)[None, None]], prefix=1).argmax()) == 4
    with pytest.raises(ValueError, match="head fusion"):
        rollout(identity, prefix=1, fusion="median")


def test_the_probe_reads_a_label_the_features_carry_and_is_at_chance_on_noise():
    g = torch.Generator().manual_seed(0)
    y = (torch.rand(2000, generator=g) < 0.1).long()  # rare positives, as defect patches are
    informative = torch.randn(2000, 32, generator=g) + 1.5 * y[:, None] * torch.randn(1, 32, generator=g)
    assert linear_probe(informative[:1000], y[:1000], informative[1000:], y[1000:]) > 0.95
    noise = torch.randn(2000, 32, generator=g)
    assert abs(linear_probe(noise[:1000], y[:1000], noise[1000:], y[1000:]) - 0.5) < 0.08
    with pytest.raises(ValueError, match="one class"):
        linear_probe(noise[:10], torch.zeros(10), noise[:10], y[:10])


def test_auroc_by_hand():
    assert auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == pytest.approx(0.75)
    assert auroc(torch.ones(4), torch.tensor([0, 1, 0, 1])) == pytest.approx(0.5)
    assert math.isnan(auroc(torch.rand(4), torch.zeros(4)))
