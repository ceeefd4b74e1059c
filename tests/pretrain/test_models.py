"""Backbone factory, weights I/O and PretrainNet: every family builds, runs and round-trips on CPU."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import timm
import torch

from pretrain.models import (
    ALIASES,
    PretrainNet,
    create_backbone,
    family_of,
    features_to_map,
    load_model,
    load_weights,
    model_config,
    model_family,
    resolve_model_name,
    save_model,
)

K = 3
# Tiny widths/depths keep the whole file fast on 2 cores; each entry is (name, img_size, timm kwargs).
FAMILIES = {
    "vit_tiny": ("vit_tiny_patch16_224", 64, {"depth": 1}),
    "vit_small": ("vit_small_patch16_224", 64, {"depth": 1, "embed_dim": 96, "num_heads": 2}),
    "vit_base": ("vit_base_patch16_224", 64, {"depth": 1, "embed_dim": 96, "num_heads": 2}),
    "vit_large": ("vit_large_patch16_224", 64, {"depth": 1, "embed_dim": 96, "num_heads": 2}),
    "vit_hybrid": ("vit_hybrid_small", 64, {"depth": 1}),
    "swin": ("swin_tiny_patch4_window7_224", 64, {"embed_dim": 24, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1)}),
    "convnext_atto": ("convnext_atto", None, {}),
    "convnext_tiny": ("convnext_tiny", None, {"depths": (1, 1, 1, 1), "dims": (16, 32, 64, 128)}),
    "resnet50": ("resnet50", None, {}),
    "resnet152": ("resnet152", None, {"layers": (1, 1, 1, 1)}),
    "hrnet": ("hrnet_w18_small", None, {}),
}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _tiny(family: str, num_classes: int = K, **overrides) -> torch.nn.Module:
    name, img_size, kwargs = FAMILIES[family]
    img_size = overrides.pop("img_size", img_size)
    torch.manual_seed(0)
    return create_backbone(name, num_classes=num_classes, img_size=img_size, **{**kwargs, **overrides})


def _config(family: str, num_classes: int = K, **overrides) -> dict:
    name, img_size, kwargs = FAMILIES[family]
    return model_config(name, num_classes=num_classes, classes=[f"c{i}" for i in range(num_classes)],
                        img_size=img_size, global_pool=None, kwargs={**kwargs, **overrides}, mean=MEAN, std=STD)


# ---------------------------------------------------------------------------------------------- names


def test_unknown_name_lists_close_names():
    with pytest.raises(ValueError, match="vit_tiny_patch16") as info:
        resolve_model_name("vit_tiny_patch16")
    assert "vit_tiny_patch16_224" in str(info.value)
    assert "closest" in str(info.value)


def test_aliases_point_to_timm_models_and_hide_none():
    for alias, target in ALIASES.items():
        assert timm.is_model(target) and target in timm.list_models(), target
        assert alias not in timm.list_models(), f"alias {alias} shadows a timm model"
        assert resolve_model_name(alias) == target
    assert resolve_model_name("resnet50") == "resnet50"
    assert resolve_model_name("hrnet_w18") == "hrnet_w18"  # a real timm model, not an alias of hrnet_w18_small


# ------------------------------------------------------------------------------------------- families


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_forward_backward_shapes(family):
    net = PretrainNet(_tiny(family), K, dense_head=True, dense_hidden=16)
    x = torch.randn(2, 3, 64, 64)
    out = net(x)
    assert out["logits"].shape == (2, K)
    assert out["dense"].shape == (2, K + 1, 64, 64)
    (out["logits"].sum() + out["dense"].mean()).backward()
    assert all(p.grad is not None for p in net.dense.parameters())
    stem = next(p for p in net.backbone.parameters() if p.requires_grad)
    assert stem.grad is not None and stem.grad.abs().sum() > 0
    net.eval()
    with torch.no_grad():
        other = net(torch.randn(1, 3, 96, 64))  # ViTs via dynamic_img_size, CNNs natively
    assert other["logits"].shape == (1, K)
    assert other["dense"].shape == (1, K + 1, 96, 64)


def test_without_dense_head_only_logits():
    out = PretrainNet(_tiny("convnext_atto"), K)(torch.randn(2, 3, 64, 64))
    assert set(out) == {"logits"}


@pytest.mark.parametrize("name", ["vit_large_patch16_224", "resnet152"])
def test_full_size_models_construct_with_the_requested_head(name):
    with torch.device("meta"):  # full width without allocating memory
        model = create_backbone(name, num_classes=K)
    assert model.get_classifier().out_features == K


@pytest.mark.parametrize(("name", "family"), [
    ("vit_tiny", "ViT"), ("vit_large", "ViT"), ("vit_small_patch14_dinov2", "ViT"), ("deit_tiny_patch16_224", "ViT"),
    ("vit_hybrid_small", "ViT-Hybrid"), ("vit_base_r50_s16_224", "ViT-Hybrid"), ("swin_tiny", "Swin"),
    ("convnext_tiny", "CNN"), ("resnet50", "CNN"), ("hrnet_w18", "CNN")])
def test_model_family_of_names(name, family):
    assert model_family(name) == family


@pytest.mark.parametrize(("tiny", "family"), [("vit_tiny", "ViT"), ("vit_hybrid", "ViT-Hybrid"), ("swin", "Swin"),
                                              ("convnext_atto", "CNN"), ("hrnet", "CNN")])
def test_family_of_built_models(tiny, family):
    assert family_of(_tiny(tiny)) == family


def test_random_init_is_logged(caplog):
    with caplog.at_level(logging.INFO, logger="pretrain.models"):
        _tiny("vit_tiny")
    assert "random initialisation" in caplog.text


def test_img_size_only_reaches_models_that_take_it():
    vit = _tiny("vit_tiny")
    assert tuple(vit.patch_embed.img_size) == (64, 64) and vit.dynamic_img_size
    cnn = create_backbone("resnet50", num_classes=K, img_size=64)  # fully convolutional: recorded, not passed
    assert cnn(torch.randn(1, 3, 64, 64)).shape == (1, K)


@pytest.mark.parametrize(("family", "size"), [("vit_tiny", 70), ("vit_hybrid", 48), ("swin", 66)])
def test_incompatible_img_size_is_a_clear_error(family, size):
    with pytest.raises(ValueError, match=rf"img_size {size} .*multiple of its patch stride"):
        _tiny(family, img_size=size)


def test_swin_accepts_small_sizes_by_clamping_windows():
    model = _tiny("swin", img_size=96)  # not a multiple of 7 * 4: timm clamps the windows to the feature size
    assert model(torch.randn(1, 3, 96, 96)).shape == (1, K)


# ---------------------------------------------------------------------------------------- global pool


def test_token_vs_avg_pool_changes_head_input():
    token = _tiny("vit_tiny", global_pool="token").eval()
    # timm's default for avg moves the final norm after pooling (fc_norm.* instead of norm.*); fc_norm=False
    # keeps the state dicts interchangeable so only the pooling differs
    assert "fc_norm.weight" in _tiny("vit_tiny", global_pool="avg").state_dict()
    avg = _tiny("vit_tiny", global_pool="avg", fc_norm=False).eval()
    avg.load_state_dict(token.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = token.forward_features(x)
        assert torch.equal(feats, avg.forward_features(x))
        assert not torch.allclose(token(x), avg(x))
        assert torch.allclose(token.forward_head(feats, pre_logits=True), feats[:, 0])
        assert torch.allclose(avg.forward_head(feats, pre_logits=True), feats[:, 1:].mean(1), atol=1e-6)


@pytest.mark.parametrize(("family", "pool", "accepted"),
                         [("vit_tiny", "catavgmax", "token"), ("resnet50", "token", "avg"), ("swin", "token", "avg")])
def test_invalid_global_pool_names_value_and_accepted(family, pool, accepted):
    with pytest.raises(ValueError, match=rf"global_pool='{pool}'.*accepted: .*{accepted}"):
        _tiny(family, global_pool=pool)


def test_cnn_max_pool_accepted():
    model = create_backbone("convnext_atto", num_classes=K, global_pool="max")
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, K)


# ------------------------------------------------------------------------------------- features_to_map


def test_features_to_map_tokens_drop_prefix_and_follow_grid():
    model = _tiny("vit_tiny", reg_tokens=4)
    assert model.num_prefix_tokens == 5
    gh, gw = 6, 4  # a 96x64 input at patch 16
    feats = torch.arange(2 * (5 + gh * gw) * 3, dtype=torch.float32).reshape(2, 5 + gh * gw, 3)
    fmap = features_to_map(model, feats, (96, 64))
    assert fmap.shape == (2, 3, gh, gw)
    # patch token t (row-major) lands at (t // gw, t % gw)
    assert torch.equal(fmap[1, :, 2, 3], feats[1, 5 + 2 * gw + 3])
    with pytest.raises(ValueError, match="input_hw"):
        features_to_map(model, feats)  # without the input size, the img_size grid (4x4) does not fit


def test_features_to_map_nhwc_and_nchw():
    swin = _tiny("swin").eval()
    feats = swin.forward_features(torch.randn(1, 3, 96, 64))
    assert feats.shape[-1] == swin.num_features
    fmap = features_to_map(swin, feats)
    assert fmap.shape == (1, swin.num_features, 3, 2) and torch.equal(fmap[0, :, 2, 1], feats[0, 2, 1])
    for family in ("convnext_atto", "hrnet"):
        cnn = _tiny(family).eval()
        feats = cnn.forward_features(torch.randn(1, 3, 96, 64))
        assert features_to_map(cnn, feats) is feats and feats.shape[1] == cnn.num_features


# ------------------------------------------------------------------------------------------ save / load


@pytest.mark.parametrize("family", ["vit_tiny", "vit_hybrid", "swin", "convnext_atto", "hrnet"])
def test_save_load_round_trip_identical(tmp_path, family):
    net = PretrainNet(_tiny(family), K, dense_head=True, dense_hidden=8)
    net(torch.randn(2, 3, 64, 64))  # move BN running stats off their init
    net.eval()
    save_model(net, tmp_path / "net", _config(family))
    save_model(net.backbone, tmp_path / "backbone", _config(family))
    x = torch.randn(2, 3, 64, 64)
    loaded_net, cfg = load_model(tmp_path / "net")
    loaded_bb, _ = load_model(tmp_path / "backbone")
    assert isinstance(loaded_net, PretrainNet) and not isinstance(loaded_bb, PretrainNet)
    assert cfg["model"] == resolve_model_name(FAMILIES[family][0]) and cfg["num_classes"] == K
    with torch.no_grad():
        ref = net(x)
        got = loaded_net(x)
        assert torch.equal(ref["logits"], got["logits"]) and torch.equal(ref["dense"], got["dense"])
        assert torch.equal(net.backbone(x), loaded_bb(x))
    assert sorted(p.name for p in (tmp_path / "net").iterdir()) == ["model.safetensors", "model_config.json"]


def test_saved_backbone_loads_into_fresh_timm_model(tmp_path):
    net = PretrainNet(_tiny("vit_tiny"), K, dense_head=True).eval()
    save_model(net.backbone, tmp_path, _config("vit_tiny"))
    fresh = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=K, img_size=64, depth=1).eval()
    report = load_weights(fresh, tmp_path / "model.safetensors")
    assert not report["missing"] and not report["unexpected"]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(fresh(x), net.backbone(x))


def test_model_config_fields_and_tampered_config_fails(tmp_path):
    cfg = _config("vit_tiny")
    assert cfg["architecture"] == "timm" and cfg["model"] == cfg["alias"] == "vit_tiny_patch16_224"
    assert cfg["classes"] == ["c0", "c1", "c2"] and cfg["mean"] == list(MEAN) and "version" in cfg
    save_model(_tiny("vit_tiny"), tmp_path, cfg)
    cfg["num_classes"] = 5
    (tmp_path / "model_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not match"):
        load_model(tmp_path)


# -------------------------------------------------------------------------------------------- weights


def _vit_outputs_equal(a, b) -> bool:
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


def test_load_nested_torch_checkpoint_with_prefixes(tmp_path):
    src = _tiny("vit_tiny")
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "state_dict": {f"module._orig_mod.{k}": v for k, v in src.state_dict().items()}}, path)
    torch.manual_seed(1)
    dst = create_backbone("vit_tiny", num_classes=K, img_size=64, depth=1, weights=path)
    assert _vit_outputs_equal(src, dst)
    report = load_weights(dst, path)
    assert len(report["loaded"]) == len(src.state_dict()) and not report["missing"] and not report["unexpected"]


@pytest.mark.parametrize("nest", ["model", "module", None])
def test_load_other_nestings(tmp_path, nest):
    src = _tiny("convnext_atto")
    path = tmp_path / "w.pth"
    torch.save({nest: src.state_dict()} if nest else src.state_dict(), path)
    assert not load_weights(_tiny("convnext_atto"), path)["missing"]


def test_shape_mismatch_names_key_shapes_and_file(tmp_path):
    path = tmp_path / "w.safetensors"
    save_model(_tiny("vit_tiny"), tmp_path, _config("vit_tiny"))
    (tmp_path / "model.safetensors").rename(path)
    # a position embedding for another image size is interpolated to the model's patch grid, not refused
    report = load_weights(_tiny("vit_tiny", img_size=(96, 64)), path)
    assert report["resampled"] == ["pos_embed"] and "pos_embed" in report["loaded"]
    with pytest.raises(ValueError, match=r"shape mismatch for '[\w.]+' in .*w\.safetensors: file \(.*192.*\), model "
                                         r"\(.*96.*\)"):
        load_weights(_tiny("vit_tiny", embed_dim=96, num_heads=3), path)
    with pytest.raises(ValueError, match=r"'head\.bias'.*file \(3,\), model \(5,\).*skip_head"):
        load_weights(_tiny("vit_tiny", num_classes=5), path)


def test_skip_head_loads_k3_backbone_into_k5_model(tmp_path):
    src = _tiny("convnext_atto", num_classes=3)
    path = tmp_path / "k3.pt"
    torch.save({"state_dict": src.state_dict()}, path)
    dst = _tiny("convnext_atto", num_classes=5)
    head_before = dst.head.fc.weight.clone()
    report = load_weights(dst, path, skip_head=True)
    assert sorted(report["skipped_head"]) == ["head.fc.bias", "head.fc.weight"]
    assert not report["missing"] and not report["unexpected"]
    assert torch.equal(dst.head.fc.weight, head_before)
    assert torch.equal(dst.stem[0].weight, src.stem[0].weight)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(src.eval().forward_features(x), dst.eval().forward_features(x))


def test_skip_head_on_pretrain_net_skips_backbone_and_dense_heads(tmp_path):
    save_model(PretrainNet(_tiny("vit_tiny"), K, dense_head=True, dense_hidden=8), tmp_path, _config("vit_tiny"))
    net5 = PretrainNet(_tiny("vit_tiny", num_classes=5), 5, dense_head=True, dense_hidden=8)
    report = load_weights(net5, tmp_path / "model.safetensors", skip_head=True)
    assert sorted(report["skipped_head"]) == ["backbone.head.bias", "backbone.head.weight", "dense.3.bias",
                                              "dense.3.weight"]


def test_strict_shapes_false_reports_mismatch(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(_tiny("vit_tiny").state_dict(), path)
    report = load_weights(_tiny("vit_tiny", embed_dim=96, num_heads=3), path, strict_shapes=False)
    assert "cls_token" in report["mismatched"] and "cls_token" not in report["loaded"]
    resampled = load_weights(_tiny("vit_tiny", img_size=96), path, strict_shapes=False)
    assert resampled["resampled"] == ["pos_embed"] and not resampled["mismatched"]


def test_missing_file_and_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_weights(_tiny("convnext_atto"), tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.bin"
    junk.write_text("this is not a checkpoint at all")
    with pytest.raises(ValueError, match=r"junk\.bin is neither a safetensors file nor a torch checkpoint"):
        load_weights(_tiny("convnext_atto"), junk)
    pickled = tmp_path / "obj.pt"
    torch.save({"state_dict": Path("x")}, pickled)  # arbitrary objects are refused by weights_only=True
    with pytest.raises(ValueError, match=r"obj\.pt"):
        load_weights(_tiny("convnext_atto"), pickled)
    other = tmp_path / "other.pt"
    torch.save({"foo.weight": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="no tensor in .*other.pt matches"):
        load_weights(_tiny("convnext_atto"), other)
