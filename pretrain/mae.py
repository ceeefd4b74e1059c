"""`objective: mae`: masked-image modelling for ViTs and ViT-Hybrids, no labels needed (He et al., 2021).

Most patch tokens (`mae_mask_ratio`, default 0.75) are hidden; the timm encoder sees only the visible ones (plus
its class/register tokens) and a small transformer decoder (`mae_decoder_dim`, `mae_decoder_depth`) fills the
hidden positions with a learned mask token and predicts their pixels. The loss is the mean squared error on the
hidden patches only, against each patch's pixels normalised by the patch's own mean and variance (MAE's
`norm_pix_loss`). A hybrid's convolutional stem would see the hidden pixels through its receptive field and leak
them into the visible tokens, so hidden patches are also blanked (set to the normalised mean, zero) in the input.

Only the encoder is kept: the run saves the timm backbone like a classification run (RUN/model.safetensors),
which `finetune init=RUN` loads as its encoder.
"""

from __future__ import annotations

import torch
from timm.layers import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block
from torch import nn

from defectforge.config import ConfigError


def token_stride(backbone: nn.Module, size: int = 224) -> int:
    """Pixels per patch token along each side (16 for a /16 ViT, 32 for the R26 hybrid), checked square."""
    gh, gw = backbone.patch_embed.dynamic_feat_size((size, size))
    if size % gh or size % gw or gh != gw:
        raise ConfigError(f"objective mae: {type(backbone).__name__}'s token grid at {size} px is {gh}x{gw}, "
                          "expected a square grid dividing the image")
    return size // gh


class MaskedAutoencoder(nn.Module):
    """A timm ViT (or hybrid) encoder + an MAE decoder; forward(x) -> {loss, pred, mask, target}."""

    def __init__(self, backbone: nn.Module, *, mask_ratio: float = 0.75, decoder_dim: int = 128,
                 decoder_depth: int = 2, decoder_heads: int = 4):
        super().__init__()
        needed = ("patch_embed", "blocks", "_pos_embed", "num_prefix_tokens", "norm")
        missing = [a for a in needed if not hasattr(backbone, a)]
        if missing or not callable(getattr(getattr(backbone, "patch_embed", None), "dynamic_feat_size", None)):
            raise ConfigError(f"objective mae needs a ViT or ViT-Hybrid (patch tokens, timm VisionTransformer); "
                              f"{type(backbone).__name__} has no {', '.join(missing) or 'patch grid'}: use "
                              "objective classification or segmentation for CNNs")
        if not getattr(backbone, "dynamic_img_size", False):
            raise ConfigError("objective mae: the ViT must be built with dynamic_img_size=True")
        self.backbone = backbone
        self.mask_ratio = mask_ratio
        self.stride = token_stride(backbone)
        dim = int(backbone.embed_dim)
        self.decoder_embed = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_blocks = nn.ModuleList(Block(decoder_dim, decoder_heads, mlp_ratio=4.0, qkv_bias=True)
                                            for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.stride * self.stride * 3)
        nn.init.normal_(self.mask_token, std=0.02)

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, N, s*s*3), row-major over the token grid."""
        b, c, h, w = images.shape
        s = self.stride
        x = images.reshape(b, c, h // s, s, w // s, s)
        return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // s) * (w // s), s * s * c)

    def unpatchify(self, patches: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, s = patches.shape[0], self.stride
        x = patches.reshape(b, h // s, w // s, s, s, 3)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(b, 3, h, w)

    def random_mask(self, b: int, n: int, device, generator: torch.Generator | None) -> torch.Tensor:
        """(B, N) bool, True = hidden; exactly round(N * mask_ratio) hidden per image, at least one visible."""
        hidden = min(n - 1, max(1, round(n * self.mask_ratio)))
        noise = torch.rand(b, n, generator=generator, device="cpu" if generator is not None else device)
        order = noise.to(device).argsort(dim=1)
        mask = torch.zeros(b, n, dtype=torch.bool, device=device)
        mask.scatter_(1, order[:, :hidden], True)
        return mask

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        b, _, h, w = images.shape
        s = self.stride
        if h % s or w % s:
            raise ValueError(f"objective mae: image size {h}x{w} is not a multiple of the token stride {s}")
        n = (h // s) * (w // s)
        mask = self.random_mask(b, n, images.device, generator)
        # blank the hidden patches in the input too (a hybrid's conv stem would otherwise see them)
        pixel_mask = mask.reshape(b, 1, h // s, 1, w // s, 1).expand(b, 1, h // s, s, w // s, s).reshape(b, 1, h, w)
        enc = self.backbone
        tokens = enc.patch_embed(images.masked_fill(pixel_mask, 0.0))
        tokens = enc.norm_pre(enc.patch_drop(enc._pos_embed(tokens)))
        prefix = enc.num_prefix_tokens
        keep = (~mask).nonzero(as_tuple=True)[1].reshape(b, -1)  # the visible positions, in order
        visible = torch.gather(tokens[:, prefix:], 1, keep[..., None].expand(-1, -1, tokens.shape[-1]))
        x = torch.cat([tokens[:, :prefix], visible], dim=1)
        for block in enc.blocks:
            x = block(x)
        x = self.decoder_embed(enc.norm(x))
        full = self.mask_token.to(x.dtype).expand(b, n, -1).clone()
        full.scatter_(1, keep[..., None].expand(-1, -1, x.shape[-1]), x[:, prefix:])
        pos = build_sincos2d_pos_embed([h // s, w // s], dim=full.shape[-1], device=full.device, dtype=full.dtype)
        y = torch.cat([x[:, :prefix], full + pos[None]], dim=1)
        for block in self.decoder_blocks:
            y = block(y)
        pred = self.decoder_pred(self.decoder_norm(y)[:, prefix:]).float()
        target = self.patchify(images.float())
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
        per_patch = (pred - target).square().mean(-1)
        loss = (per_patch * mask).sum() / mask.sum()
        return {"loss": loss, "pred": pred, "mask": mask, "target": target, "mean": mean, "std": (var + 1e-6).sqrt()}

    def reconstruct(self, images: torch.Tensor, out: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked input, reconstruction with the visible patches pasted back), both in the images' space."""
        h, w = images.shape[-2:]
        patches = self.patchify(images.float())
        pred = out["pred"] * out["std"] + out["mean"]
        hidden = out["mask"][..., None]
        masked = self.unpatchify(patches.masked_fill(hidden, 0.0), h, w)
        recon = self.unpatchify(torch.where(hidden, pred, patches), h, w)
        return masked, recon
