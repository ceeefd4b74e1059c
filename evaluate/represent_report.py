"""The figures and the report section "How the models see" (evaluate/represent_run.py's results), and the
`python -m evaluate represent` command: out/represent.json, the PNGs, report.md and report.html."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from defectforge.files import claim_output, write_atomic
from pretrain.models import VIT_FAMILIES

from .claims import represent_claims
from .report import Doc, machine, plt
from .represent_run import RepresentConfig, load_subject, measure, square_crops

log = logging.getLogger("evaluate")


def cka_figure(rep: dict):
    """One heatmap per pair of models (rows: first model's layers, columns: second's), the diagonal included."""
    names, matrix = rep["cka"]["names"], np.array(rep["cka"]["matrix"])
    models = [m["name"] for m in rep["models"]]
    index = {m: [i for i, n in enumerate(names) if n.split("/")[0] == m] for m in models}
    k = len(models)
    fig, axes = plt.subplots(k, k, figsize=(2.9 * k + 1, 2.7 * k), squeeze=False, layout="constrained")
    image = None
    for r, a in enumerate(models):
        for c, b in enumerate(models):
            ax = axes[r, c]
            image = ax.imshow(matrix[np.ix_(index[a], index[b])], vmin=0, vmax=1, cmap="magma", origin="lower",
                              aspect="auto")
            ax.set_xlabel(f"{b} layer", fontsize=7)
            ax.set_ylabel(f"{a} layer", fontsize=7)
            la, lb = len(index[a]), len(index[b])
            ax.set_xticks(range(lb), [str(i + 1) for i in range(lb)], fontsize=6)
            ax.set_yticks(range(la), [str(i + 1) for i in range(la)], fontsize=6)
    fig.colorbar(image, ax=axes, shrink=0.6, label="linear CKA")
    return fig


def distance_figure(rep: dict):
    """One dot per head at its block (ViTs), and each CNN stage's receptive field, on the same depth axis."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for n, m in enumerate(rep["models"]):
        color = f"C{n % 10}"
        if m["attention_distance"]:
            for layer, heads in enumerate(m["attention_distance"]):
                x = layer + 1 + (n - len(rep["models"]) / 2) * 0.06
                ax.scatter([x] * len(heads), heads, s=14, color=color, alpha=0.75,
                           label=f"{m['name']} ({m['family']}: heads)" if layer == 0 else None)
        if m["receptive_field"]:
            fields = m["receptive_field"]
            ax.plot([f["depth"] for f in fields], [f["mean_distance"] for f in fields], "s-", color=color,
                    label=f"{m['name']} ({m['family']}: receptive field per stage)")
    ax.axhline(rep["crop"] / 2, color="gray", ls=":", lw=1)
    ax.annotate("half the crop (about uniform attention)", (0.5, rep["crop"] / 2), fontsize=7, color="gray",
                xytext=(2, 2), textcoords="offset points")
    ax.set_xlabel("depth: ViT block / CNN encoder stage")
    ax.set_ylabel("mean distance (px)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def probe_figure(rep: dict):
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for m in rep["models"]:
        if m["probe"]:
            label = f"{m['name']} ({m['kind']}" + (f", global_pool={m['global_pool']})" if m["global_pool"] else ")")
            ax.plot(range(1, len(m["probe"]) + 1), m["probe"], "o-", label=label)
    ax.axhline(0.5, color="gray", ls=":", lw=1, label="chance")
    ax.set_ylim(0.4, 1.0)
    ax.set_xlabel("ViT block")
    ax.set_ylabel("probe balanced accuracy (own patch defect?)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def maps_figure(maps: dict):
    rows = [(name, item) for name, items in maps.items() for item in items]
    cols = 1 + max(len(item[3]) for _, item in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.6 * cols, 2.6 * len(rows)), squeeze=False)
    for r, (name, (key, image, mask, by_method)) in enumerate(rows):
        panels = [("image", None)] + list(by_method.items())
        for c in range(cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(panels):
                ax.axis("off")
                continue
            title, sal = panels[c]
            ax.imshow(image.permute(1, 2, 0).numpy())
            if sal is not None:
                ax.imshow(sal, cmap="inferno", alpha=0.6)
            ax.contour(mask.numpy() > 0, levels=[0.5], colors="cyan", linewidths=0.7)
            ax.set_title(title if c else f"{name}\n{key}", fontsize=7)
    return fig


def represent_section(doc: Doc, rep: dict, maps: dict, claims: list | None = None) -> None:
    """'How the models see': the CKA heatmaps, the attention-distance plot, the maps and the probe curve."""
    doc.heading("How the models see")
    doc.para(f"After Raghu et al. (2021), on {rep['images']} evaluation images cropped to {rep['crop']} px "
             f"(minibatches of {rep['batch_size']}). Layers: ViT blocks (patch tokens, prefix tokens excluded) and "
             "CNN encoder stages, each average-pooled to at most "
             f"{rep['cka_grid']}x{rep['cka_grid']} cells before linear CKA (unbiased HSIC, minibatch estimator).")
    doc.image(cka_figure(rep), "cka.png", "linear CKA between every layer of every pair of models (1 = same "
              "representation up to rotation and scale)")
    doc.image(distance_figure(rep), "attention_distance.png", "mean attention distance of every head per block "
              "(dots), and each CNN stage's effective receptive field as the gradient-weighted mean distance "
              "(squares)")
    rows = [[m["name"], m["family"], method, s["images"], f"{s['pointing_game']:.2f}", f"{s['energy_in_defect']:.2f}",
             f"{s['energy_chance']:.2f}", f"{s['auroc']:.3f}"]
            for m in rep["models"] for method, s in m["localization"].items()]
    if rows:
        doc.table(["run", "family", "map", "images", "pointing game", "energy in defect", "chance", "AUROC"], rows)
        doc.para(f"Rollout: heads fused by {rep['rollout_fusion']}, lowest {rep['discard_ratio']:.0%} of the weights "
                 "discarded per block. AUROC: the map's values as a detector of defect pixels (0.5 = chance).")
    if any(maps.values()):
        doc.image(maps_figure(maps), "represent_maps.png", "last-layer class-token attention, attention rollout "
                  "(ViTs) and Grad-CAM (CNNs), with the defect outline")
    if any(m["probe"] for m in rep["models"]):
        doc.image(probe_figure(rep), "probe.png", "linear probe of each patch token for its own patch's defect "
                  "label, per block (balanced accuracy; trained on half the images, tested on the other half)")
    fields = [[m["name"], f["layer"], f"{f['stride']:.0f}", f"{f['mean_distance']:.1f}", f["size"]]
              for m in rep["models"] for f in m["receptive_field"] or []]
    if fields:
        doc.table(["run", "stage", "stride", "receptive field: mean distance (px)",
                   f"side holding {rep['erf_share']:.0%} of the gradient (px)"], fields)
    if claims:
        doc.table(["claim", "verdict", "evidence"], [[c.claim, c.verdict, c.evidence] for c in claims])


def describe(rep: dict, cfg: RepresentConfig) -> dict:
    return {**rep, "batch_size": cfg.batch_size, "cka_grid": cfg.cka_grid, "erf_share": cfg.erf_share,
            "rollout_fusion": cfg.rollout_fusion, "discard_ratio": cfg.discard_ratio}


def represent_images(cfg: RepresentConfig, models: list[str], images: list[dict]) -> tuple[dict, dict]:
    """Load every model, crop the images and measure; (represent.json content, maps)."""
    from .run import resolve_device

    device = resolve_device(cfg.device)
    subjects = [load_subject(m, device) for m in models]
    rep, maps = measure(subjects, square_crops(images, cfg.crop), cfg)
    return describe(rep, cfg), maps


def run_represent(cfg: RepresentConfig, models: list[str], shards: list[str], out: str | Path,
                  commands: list[str] | None = None) -> Path:
    """`python -m evaluate represent`: out/represent.json, the figures, report.md and report.html."""
    from .run import load_images

    for run in models:
        if not (Path(run) / "model_config.json").is_file():
            raise FileNotFoundError(f"{run} is not a finetune or pretrain run (no model_config.json)")
    out = claim_output(out, "represent")
    images, _, sources = load_images(shards, cfg)
    rep, maps = represent_images(cfg, models, images)
    claims = represent_claims(rep, cfg.probe_margin)
    rep["claims"] = [c.__dict__ for c in claims]
    rep["sources"] = sources
    write_atomic(out / "represent.json", json.dumps(rep, indent=2, default=float) + "\n")
    doc = Doc(out)
    doc.para(f"Models: {', '.join(m['name'] + ' (' + m['family'] + ')' for m in rep['models'])}. Data: "
             f"{', '.join(sources)}. Machine: {machine()}.")
    represent_section(doc, rep, maps, claims)
    doc.heading("How this report was made")
    doc.code(commands or ["python -m evaluate represent ..."])
    vits = [m for m in rep["models"] if m["family"] in VIT_FAMILIES]
    log.info("represent: %d models (%d with attention), %d images", len(rep["models"]), len(vits), rep["images"])
    return doc.write("defectforge: how the models see")
