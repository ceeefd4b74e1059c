"""CutMix / Mixup with masks: exact label weights, pixel provenance, clipping, soft targets, config errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pretrain.cutmix as cutmix
from pretrain.cutmix import MixConfig, _cutmix_boxes, _sample_beta, mix_batch

H = W = 32


def _two_constant_samples() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images = torch.stack([torch.zeros(3, H, W), torch.ones(3, H, W)])
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    masks = torch.stack([torch.full((H, W), 1), torch.full((H, W), 2)])
    return images, labels, masks


def test_cutmix_label_is_pasted_area_and_mask_follows_pixels() -> None:
    images, labels, masks = _two_constant_samples()
    cfg = MixConfig(cutmix_alpha=1.0, cutmix_prob=1.0)
    clipped_seen = 0
    for seed in range(40):
        out, lab, dense, info = mix_batch(images, labels, masks, cfg, torch.Generator().manual_seed(seed))
        assert info["mode"] == "cutmix"
        assert info["perm"].tolist() == [1, 0]
        assert dense.dtype == torch.long and dense.shape == (2, H, W)
        for i in range(2):
            partner_value = float(1 - i)
            from_partner = out[i] == partner_value
            assert torch.equal(from_partner.all(0), from_partner.any(0)), "all channels come from one image"
            area = from_partner[0].float().mean()
            # Label weight is the fraction of pixels that actually came from the partner.
            assert lab[i, 1 - i].item() == pytest.approx(area.item(), abs=1e-6)
            assert lab[i, i].item() == pytest.approx(1 - area.item(), abs=1e-6)
            assert info["lam"][i].item() == pytest.approx(area.item(), abs=1e-6)
            # Each mask pixel comes from the image that pixel came from.
            assert torch.equal(dense[i] == 2, out[i, 0] == 1)
            assert torch.equal(dense[i] == 1, out[i, 0] == 0)
            # The pasted pixels are exactly the reported box.
            y0, y1, x0, x1 = info["boxes"][i].tolist()
            box = torch.zeros(H, W, dtype=torch.bool)
            box[y0:y1, x0:x1] = True
            assert torch.equal(from_partner[0], box)
            lam = info["lam"][i].item()
            if 0 < lam and (y0 == 0 or x0 == 0 or y1 == H or x1 == W):
                clipped_seen += 1
    assert clipped_seen > 0, "some seed should produce a box clipped at the border"


def test_boxes_clip_at_border() -> None:
    lam = torch.tensor([0.75, 0.75, 0.75])
    centres = torch.tensor([[0, 0], [31, 31], [16, 16]])
    boxes = _cutmix_boxes(lam, H, W, centres=centres)
    # sqrt(1 - 0.75) = 0.5 -> 16 px sides: corner boxes keep an 8x8 quarter, the centred one all of it.
    assert boxes.tolist() == [[0, 8, 0, 8], [23, 32, 23, 32], [8, 24, 8, 24]]
    assert boxes.dtype == torch.long


def test_label_weight_follows_clipped_area(monkeypatch: pytest.MonkeyPatch) -> None:
    def corner_boxes(lam, height, width, generator=None):
        return _cutmix_boxes(lam, height, width, centres=torch.zeros(lam.shape[0], 2, dtype=torch.long))

    monkeypatch.setattr(cutmix, "_cutmix_boxes", corner_boxes)
    monkeypatch.setattr(cutmix, "_sample_beta", lambda alpha, n, generator, device: torch.full((n,), 0.75))
    images, labels, masks = _two_constant_samples()
    out, lab, dense, info = mix_batch(images, labels, masks, MixConfig(), torch.Generator().manual_seed(0))
    expected = 64 / (H * W)  # the 8x8 quarter of a 16x16 box; lam alone would say 0.25
    assert info["lam"].tolist() == pytest.approx([expected, expected])
    torch.testing.assert_close(lab, torch.tensor([[1 - expected, expected], [expected, 1 - expected]]))
    assert (out[0, 0] == 1).sum().item() == 64
    assert torch.equal(dense[0] == 2, out[0, 0] == 1)


def test_no_mixing_when_prob_zero() -> None:
    images, labels, masks = _two_constant_samples()
    out, lab, dense, info = mix_batch(images, labels, masks, MixConfig(cutmix_prob=0.0, mixup_alpha=1.0),
                                      torch.Generator().manual_seed(0))
    assert out is images and lab is labels and dense is masks
    assert info["mode"] == "none" and info["boxes"] is None
    assert info["lam"].tolist() == [0.0, 0.0]


def test_cutmix_prob_mixes_that_share_of_batches() -> None:
    images, labels, masks = _two_constant_samples()
    cfg = MixConfig(cutmix_alpha=1.0, cutmix_prob=0.3)
    modes = [mix_batch(images, labels, masks, cfg, torch.Generator().manual_seed(s))[3]["mode"] for s in range(200)]
    assert 0.2 < modes.count("cutmix") / len(modes) < 0.4
    assert set(modes) == {"cutmix", "none"}


def test_mixup_targets_are_blended_probabilities() -> None:
    g = torch.Generator().manual_seed(3)
    images = torch.rand(4, 3, H, W, generator=g)
    masks = torch.randint(0, 3, (4, H, W), generator=g)
    labels = torch.stack([torch.isin(torch.tensor([1, 2]), m.unique()).float() for m in masks])
    cfg = MixConfig(cutmix_alpha=0.0, mixup_alpha=0.4)
    out, lab, dense, info = mix_batch(images, labels, masks, cfg, torch.Generator().manual_seed(1))
    assert info["mode"] == "mixup" and info["boxes"] is None
    perm, lam = info["perm"], info["lam"]
    assert sorted(perm.tolist()) == [0, 1, 2, 3] and all(perm[i] != i for i in range(4))
    assert dense.shape == (4, 3, H, W) and dense.dtype == torch.float32
    torch.testing.assert_close(dense.sum(1), torch.ones(4, H, W))
    w = lam.view(-1, 1, 1, 1)
    torch.testing.assert_close(out, (1 - w) * images + w * images[perm])
    one_hot = F.one_hot(masks, 3).permute(0, 3, 1, 2).float()
    torch.testing.assert_close(dense, (1 - w) * one_hot + w * one_hot[perm])
    torch.testing.assert_close(lab, (1 - lam[:, None]) * labels + lam[:, None] * labels[perm])
    loss = F.cross_entropy(torch.randn(4, 3, H, W), dense)
    assert torch.isfinite(loss)


def test_label_mode_mask_gives_exact_presence() -> None:
    masks = torch.zeros(2, H, W, dtype=torch.long)
    masks[0, 2:6, 2:6] = 1  # a small defect near the top-left corner
    masks[1, 20:30, 20:30] = 2
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    images = masks[:, None].float().expand(2, 3, H, W).contiguous()
    cfg = MixConfig(cutmix_alpha=1.0, label_mode="mask")
    outcomes = set()
    for seed in range(60):
        _, lab, dense, _ = mix_batch(images, labels, masks, cfg, torch.Generator().manual_seed(seed))
        for i in range(2):
            present = [float((dense[i] == k).any()) for k in (1, 2)]
            assert lab[i].tolist() == present
            outcomes.add(tuple(present))
    assert len(outcomes) >= 3, "the seeds should cover cut-away and pasted defects"


def test_per_sample_lambda_and_determinism() -> None:
    g = torch.Generator().manual_seed(0)
    images, masks = torch.rand(8, 3, H, W, generator=g), torch.randint(0, 3, (8, H, W), generator=g)
    labels = torch.rand(8, 2, generator=g)
    cfg = MixConfig(cutmix_alpha=1.0)
    a = mix_batch(images, labels, masks, cfg, torch.Generator().manual_seed(5))
    b = mix_batch(images, labels, masks, cfg, torch.Generator().manual_seed(5))
    c = mix_batch(images, labels, masks, cfg, torch.Generator().manual_seed(6))
    for x, y in zip(a[:3], b[:3], strict=True):
        assert torch.equal(x, y)
    assert torch.equal(a[3]["boxes"], b[3]["boxes"]) and torch.equal(a[3]["perm"], b[3]["perm"])
    assert not torch.equal(a[3]["boxes"], c[3]["boxes"])
    assert len(set(a[3]["lam"].tolist())) > 1, "each sample draws its own lambda and box"


@pytest.mark.parametrize(("switch_prob", "mode"), [(1.0, "cutmix"), (0.0, "mixup")])
def test_switch_prob_picks_the_mode(switch_prob: float, mode: str) -> None:
    images, labels, masks = _two_constant_samples()
    cfg = MixConfig(cutmix_alpha=1.0, mixup_alpha=1.0, switch_prob=switch_prob)
    for seed in range(5):
        assert mix_batch(images, labels, masks, cfg, torch.Generator().manual_seed(seed))[3]["mode"] == mode


def test_beta_sampler_matches_moments() -> None:
    for alpha in (0.2, 0.7, 2.0):
        x = _sample_beta(alpha, 20000, torch.Generator().manual_seed(0), torch.device("cpu"))
        assert torch.isfinite(x).all() and (x >= 0).all() and (x <= 1).all()
        assert x.mean().item() == pytest.approx(0.5, abs=0.01)
        assert x.var().item() == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.05)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("cutmix_alpha", -0.1, ">= 0"),
        ("mixup_alpha", -1.0, ">= 0"),
        ("cutmix_prob", 1.5, "[0, 1]"),
        ("switch_prob", -0.2, "[0, 1]"),
        ("label_mode", "pixels", "'area', 'mask'"),
    ],
)
def test_bad_config_names_key_value_and_expectation(key: str, value: object, expected: str) -> None:
    cfg = MixConfig(**{key: value})
    with pytest.raises(ValueError) as err:
        cfg.validate()
    message = str(err.value)
    assert f"'{key}'" in message and repr(value) in message and expected in message
    images, labels, masks = _two_constant_samples()
    with pytest.raises(ValueError, match=key):
        mix_batch(images, labels, masks, cfg)


def test_bad_inputs_are_rejected() -> None:
    images, labels, masks = _two_constant_samples()
    with pytest.raises(ValueError, match="masks"):
        mix_batch(images, labels, masks.float(), MixConfig())
    with pytest.raises(ValueError, match="labels"):
        mix_batch(images, labels[:1], masks, MixConfig())
