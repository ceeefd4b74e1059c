"""The report: `report.md` and a self-contained `report.html` (images embedded), plus the same to W&B.

Every number comes from `results.json` of this evaluation; the "usual claims" are checked against them and
marked supported, not supported, inconclusive (an accuracy difference whose 95% interval over the evaluation
images includes 0) or not measured (with the reason), never assumed.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import platform
from datetime import UTC, datetime
from pathlib import Path

import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from defectforge.tracking import class_palette  # noqa: E402
from evaluate.metrics import mean_difference, miou_difference  # noqa: E402

GB = 1024 ** 3


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


class Doc:
    """Markdown and HTML written side by side from the same calls."""

    def __init__(self, out: Path):
        self.out, self.md, self.html = out, [], []

    def heading(self, text: str, level: int = 2) -> None:
        self.md.append(f"{'#' * level} {text}\n")
        self.html.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def para(self, text: str) -> None:
        self.md.append(text + "\n")
        self.html.append(f"<p>{html.escape(text)}</p>")

    def table(self, header: list[str], rows: list[list]) -> None:
        self.md.append("| " + " | ".join(header) + " |")
        self.md.append("|" + "---|" * len(header))
        self.md.extend("| " + " | ".join(str(c) for c in row) + " |" for row in rows)
        self.md.append("")
        cells = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
        self.html.append(f"<table><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>")

    def image(self, fig, name: str, caption: str) -> Path:
        path = self.out / name
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        path.write_bytes(buf.getvalue())
        self.md.append(f"![{caption}]({name})\n")
        data = base64.b64encode(buf.getvalue()).decode()
        self.html.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        return path

    def code(self, lines: list[str]) -> None:
        self.md.append("```\n" + "\n".join(lines) + "\n```\n")
        self.html.append("<pre>" + html.escape("\n".join(lines)) + "</pre>")

    def write(self, title: str) -> Path:
        (self.out / "report.md").write_text(f"# {title}\n\n" + "\n".join(self.md) + "\n")
        style = ("body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}table{border-collapse:collapse;"
                 "margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#eee}"
                 "img{max-width:100%}pre{background:#f6f6f6;padding:1em;overflow-x:auto}")
        page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{''.join(self.html)}</body></html>")
        path = self.out / "report.html"
        path.write_text(page)
        return path


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {gpu}; Python {platform.python_version()}, torch {torch.__version__}, "
            f"{platform.system()} {platform.release()}")


DIFFUSION_SOURCES = ("inpaint", "refine", "pretrained")  # `source` of shards made by a diffusion backend


def _best(results: list[dict], family: str | tuple[str, ...], key) -> dict | None:
    families = (family,) if isinstance(family, str) else family
    pool = [r for r in results if r["family"] in families and key(r) is not None and not math.isnan(key(r))]
    return max(pool, key=key) if pool else None


def _miou(r: dict) -> float:
    return r["metrics"]["mIoU"]


def _loc(r: dict) -> tuple[float, float]:
    i = r["interpretability"]
    return i["pointing_game"], i["energy_in_defect"]


def _loc_text(r: dict) -> str:
    i = r["interpretability"]
    return f"{i['pointing_game']:.2f} / {i['energy_in_defect']:.2f} (chance {i['energy_chance']:.2f})"


def _mem(r: dict) -> float:
    """GB a model adds during tiled 4K inference (CUDA: peak allocated; CPU: peak RSS over the RSS before)."""
    tiled = r["cost"]["tiled"]
    return (tiled["peak_memory_bytes"] if tiled["memory_kind"] == "cuda_peak_allocated"
            else tiled["memory_increase_bytes"]) / GB


def _speed(r: dict) -> float:
    return r["cost"]["tiled"]["seconds_per_image"]


def _diffused(r: dict) -> bool:
    return any(s in DIFFUSION_SOURCES for s in r.get("pretrain_sources") or [])


def _better(a: dict, b: dict, what: str, margin: float) -> list[str]:
    """Verdict and evidence for "a has a higher mIoU than b", decided by a paired bootstrap over the evaluation
    images (`evaluate.metrics.miou_difference`) and the smallest gain that counts (`margin`, mIoU):
    supported when the 95% interval of the difference lies above 0 and the difference is at least `margin`;
    not supported when the whole interval lies below `margin` (b is better, or a's gain is negligible);
    inconclusive otherwise (the choice of images could turn the result either way)."""
    ci = miou_difference(a["metrics"].get("image_confusion") or [], b["metrics"].get("image_confusion") or [])
    evidence = f"{what}: mIoU {_miou(a):.3f} vs {_miou(b):.3f}"
    if ci is None:  # results without per-image confusions (older results.json): the bare comparison
        return ["supported" if _miou(a) - _miou(b) >= margin else "not supported",
                evidence + f" (no per-image data for an interval; margin {margin:.3f})"]
    if ci["low"] > 0 and ci["difference"] >= margin:
        verdict = "supported"
    elif ci["high"] < margin:
        verdict = "not supported"
    else:
        verdict = "inconclusive"
    return [verdict, f"{evidence}; difference {ci['difference']:+.4f}, 95% interval {ci['low']:+.4f} to "
            f"{ci['high']:+.4f} (paired bootstrap over {ci['images']} images; a gain counts from {margin:.3f})"]


def claims(results: list[dict], margin: float = 0.01) -> list[list[str]]:
    """The usual ViT-vs-CNN claims against this evaluation's numbers; `margin`: the smallest mIoU gain that
    counts as a win (the evaluation's `claim_margin`)."""
    rows = []
    cnn = _best(results, "CNN", _miou)
    fastest_cnn = min((r for r in results if r["family"] == "CNN"), key=_speed, default=None)
    fastest_vit = min((r for r in results if r["family"] in ("ViT", "ViT-Hybrid")), key=_speed, default=None)
    if fastest_cnn and fastest_vit:
        a, b = _speed(fastest_cnn), _speed(fastest_vit)
        rows.append(["CNNs are faster on 4K images (claimed 0.3 vs 2.1 s)",
                     "supported" if a < b else "not supported",
                     f"fastest CNN {fastest_cnn['name']} {a:.2f} s, fastest ViT {fastest_vit['name']} {b:.2f} s"])
        ma, mb = _mem(fastest_cnn), _mem(fastest_vit)
        rows.append(["CNNs need less memory at 4K (claimed 8 vs 24 GB)", "supported" if ma < mb else "not supported",
                     f"{fastest_cnn['name']} +{ma:.2f} GB, {fastest_vit['name']} +{mb:.2f} GB during tiled 4K "
                     "inference (over the process's memory before it)"])
    else:
        rows.append(["CNNs are faster / lighter on 4K images", "not measured", "needs at least one CNN and one ViT"])
    pre_vit = _best([r for r in results if r["pretrained"]], ("ViT", "ViT-Hybrid"), _miou)
    if pre_vit and cnn:
        rows.append(["Pretrained ViTs win on pixel accuracy",
                     *_better(pre_vit, cnn, f"{pre_vit['name']} vs best CNN {cnn['name']}", margin)])
    else:
        rows.append(["Pretrained ViTs win on pixel accuracy", "not measured", "needs a pretrained ViT and a CNN"])
    pairs = [(p, s) for p in results for s in results if p["pretrained"] and not s["pretrained"]
             and p["model"] == s["model"] and p["train_samples"] == s["train_samples"]
             and p["family"] in ("ViT", "ViT-Hybrid")]
    if pairs:
        p, s = max(pairs, key=lambda ps: _miou(ps[0]))
        rows.append(["Synthetic pretraining (with CutMix) makes ViTs viable",
                     *_better(p, s, f"{p['name']} vs from scratch {s['name']}", margin)])
    else:
        rows.append(["Synthetic pretraining makes ViTs viable", "not measured",
                     "needs the same ViT pretrained and from scratch"])
    hybrid, plain = _best(results, "ViT-Hybrid", _miou), _best(results, "ViT", _miou)
    if hybrid and plain:
        rows.append(["ViT-Hybrid (conv stem) improves mIoU", *_better(hybrid, plain, f"{hybrid['name']} vs "
                                                                     f"{plain['name']}", margin)])
    else:
        rows.append(["ViT-Hybrid (conv stem) improves mIoU", "not measured", "needs a ViT-Hybrid and a plain ViT"])
    sizes = sorted({r["train_samples"] for r in results if r["train_samples"] is not None})
    small = [r for r in results if sizes and r["train_samples"] == sizes[0]]
    c, v = _best(small, "CNN", _miou), _best(small, ("ViT", "ViT-Hybrid"), _miou)
    if c and v:
        rows.append([f"CNNs win with little data ({sizes[0]} training images)",
                     *_better(c, v, f"{c['name']} vs {v['name']}", margin)])
    else:
        rows.append(["CNNs win with little data", "not measured", "no reduced training set in this evaluation"
                     if not sizes else f"needs a CNN and a ViT fine-tuned on the smallest subset ({sizes[0]} images)"])
    att = [r for r in results if (r.get("interpretability") or {}).get("method") == "attention"
           and r["interpretability"].get("images")]
    cam = [r for r in results if (r.get("interpretability") or {}).get("method") == "grad-cam"
           and r["interpretability"].get("images")]
    if att and cam:
        a, c = max(att, key=_loc), max(cam, key=_loc)
        evidence = (f"pointing game / energy in defect: {a['name']} attention {_loc_text(a)}, {c['name']} Grad-CAM "
                    f"{_loc_text(c)}")
        hits = [[float(s["hit"]) for s in r["interpretability"].get("per_image") or []] for r in (a, c)]
        ci = mean_difference(*hits)
        if ci is None:  # results without per-image scores (older results.json): the bare comparison
            verdict = "supported" if _loc(a) > _loc(c) else "not supported"
        else:  # the pointing game decides, paired over the same images
            verdict = "supported" if ci["low"] > 0 else "not supported" if ci["high"] <= 0 else "inconclusive"
            evidence += (f"; pointing-game difference {ci['difference']:+.2f}, 95% interval {ci['low']:+.2f} to "
                         f"{ci['high']:+.2f} (paired bootstrap over {ci['images']} images)")
        rows.append(["Attention maps localize defects better than Grad-CAM", verdict, evidence])
    else:
        rows.append(["Attention maps localize defects better than Grad-CAM", "not measured",
                     "needs a ViT and a CNN scored on images with defects (interpret_images > 0)"])
    seams = [r for r in results if r["metrics"]["seam_ratio"] is not None]
    if seams:
        worst = max(seams, key=lambda r: r["metrics"]["seam_ratio"])
        rows.append(["Tile overlap removes seam artifacts",
                     "supported" if worst["metrics"]["seam_ratio"] <= 1.1 else "not supported",
                     f"error near seams / elsewhere: worst {worst['name']} {worst['metrics']['seam_ratio']:.2f} "
                     "(1.0 = no seam effect)"])
    else:
        rows.append(["Tile overlap removes seam artifacts", "not measured", "no image needed more than one tile"])
    diffusion = [(d, p) for d in results for p in results
                 if _diffused(d) and p.get("pretrain_sources") and not _diffused(p)
                 and d["model"] == p["model"] and d["train_samples"] == p["train_samples"]]
    if diffusion:  # only when the study pretrained the same model with and without diffusion data
        d, p = max(diffusion, key=lambda dp: _miou(dp[0]))
        rows.append(["Diffusion-generated data improves synthetic pretraining",
                     *_better(d, p, f"{d['name']} (pretrained on {' + '.join(d['pretrain_sources'])}) vs {p['name']} "
                                    f"(pretrained on {' + '.join(p['pretrain_sources'])})", margin)])
    return rows


def _overlay_figure(sample: dict, predictions: dict[str, dict], classes: list[str]):
    palette = class_palette(classes).astype(np.float32) / 255
    image = sample["image"].permute(1, 2, 0).numpy()
    mask = sample["mask"].numpy()
    h, w = mask.shape
    # zoom on a thin defect (crack or scratch) when there is one, else any defect, else the centre
    thin = [i for i, c in enumerate(classes) if c in ("crack", "scratch")]
    ys, xs = np.nonzero(np.isin(mask, thin)) if thin else (np.array([]), np.array([]))
    if ys.size == 0:
        ys, xs = np.nonzero(mask)
    cy, cx = (int(ys[ys.size // 2]), int(xs[xs.size // 2])) if ys.size else (h // 2, w // 2)
    side = min(384, h, w)
    y0, x0 = min(max(0, cy - side // 2), h - side), min(max(0, cx - side // 2), w - side)
    columns = [("image", None), ("ground truth", mask)] + [(name, p[sample["key"]]) for name, p in predictions.items()
                                                           if sample["key"] in p]
    fig, axes = plt.subplots(2, len(columns), figsize=(3.2 * len(columns), 6.4), squeeze=False)
    for col, (title, labels) in enumerate(columns):
        for row, (ys_, xs_) in enumerate(((slice(None), slice(None)), (slice(y0, y0 + side), slice(x0, x0 + side)))):
            view = image[ys_, xs_]
            if labels is not None:
                lab = labels[ys_, xs_]
                color = palette[np.clip(lab, 0, len(palette) - 1)]
                view = np.where(lab[..., None] > 0, 0.35 * view + 0.65 * color, view)
            axes[row, col].imshow(view)
            axes[row, col].set_xticks([])
            axes[row, col].set_yticks([])
            if row == 0:
                axes[row, col].set_title(title, fontsize=9)
        axes[0, col].add_patch(plt.Rectangle((x0, y0), side, side, fill=False, color="yellow", lw=1))
    fig.suptitle(f"{sample['key']} ({w}x{h}); bottom: {side}x{side} zoom at full resolution", fontsize=10)
    return fig


def _maps_figure(maps: dict[str, list]):
    names = [n for n, m in maps.items() if m]
    cols = max(len(maps[n]) for n in names)
    fig, axes = plt.subplots(len(names), cols, figsize=(3.4 * cols, 3.2 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        for col in range(cols):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            if col >= len(maps[name]):
                ax.axis("off")
                continue
            key, image, mask, saliency = maps[name][col]
            ax.imshow(image.permute(1, 2, 0).numpy() if image.shape[0] == 3 else image[0].numpy(), cmap="gray")
            ax.imshow(saliency, cmap="inferno", alpha=0.55)
            ax.contour(mask.numpy() > 0, levels=[0.5], colors="cyan", linewidths=0.8)
            ax.set_title(f"{name}\n{key}", fontsize=7)
    return fig


def write_report(out: Path, payload: dict, overlays: list[dict], predictions: dict[str, dict],
                 maps: dict[str, list] | None = None) -> Path:
    results, cfg = payload["results"], payload["config"]
    doc = Doc(out)
    doc.para(f"Generated {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} on {machine()}; device "
             f"{payload['device']}. Data: {payload['images']} images from {', '.join(payload['sources'])}; classes "
             f"{', '.join(payload['classes'])}. Tiles {cfg['tile_size']} px, overlap {cfg['overlap']:.0%}, "
             f"{cfg['blend']} blending. Speed: median of {cfg['repeats']} timed runs on "
             f"{cfg['speed_size'][1]}x{cfg['speed_size'][0]} images ({results[0]['cost']['tiled']['source']}).")
    doc.heading("Results per model")
    rows = []
    for r in results:
        m, c = r["metrics"], r["cost"]
        rows.append([r["name"], r["family"], r["model"], "yes" if r["pretrained"] else "no",
                     _fmt(r["train_samples"]), _fmt(m["mIoU"]), _fmt(m["defect_mIoU"]), _fmt(m["ODS_F1"]),
                     _fmt(m["OIS_F1"]), _fmt(m["pixel_AP"]), _fmt(m["image_AP"]),
                     _fmt(c["tiled"]["seconds_per_image"], 2), _fmt(c["tiled"]["tiles_per_s"], 1),
                     f"{_fmt(c['tiled']['peak_memory_bytes'] / GB, 2)} (+{_fmt(_mem(r), 2)})",
                     _fmt(c["parameters"] / 1e6, 1),
                     _fmt(c["gflops_per_tile"], 1), _fmt(m["seam_ratio"], 2)])
    doc.table(["run", "family", "timm model", "pretrained", "train images", "mIoU", "defect mIoU",
               f"ODS F1 ({cfg['tolerance']} px)", "OIS F1", "pixel AP", "image AP", "s / 4K image", "tiles/s",
               "peak memory GB (+ during inference)", "params (M)", "GFLOPs / tile", "seam / other error"], rows)
    doc.heading("Per class")
    doc.table(["run", "class", "IoU", "Dice", "precision", "recall"],
              [[r["name"], name, _fmt(v["IoU"]), _fmt(v["Dice"]), _fmt(v["precision"]), _fmt(v["recall"])]
               for r in results for name, v in r["metrics"]["per_class"].items()])
    doc.heading("The usual ViT-vs-CNN trade-off, measured")
    cnn = _best(results, "CNN", _miou)
    vit = _best(results, ("ViT", "ViT-Hybrid"), _miou)

    def col(r: dict | None, fn) -> str:
        return "n/a" if r is None else fn(r)

    doc.table(["aspect", f"CNN ({cnn['name'] if cnn else 'none'})", f"ViT ({vit['name'] if vit else 'none'})"], [
        ["4K inference speed (s / image)", col(cnn, lambda r: _fmt(_speed(r), 2)), col(vit, lambda r: _fmt(_speed(r),
                                                                                                            2))],
        ["memory during tiled 4K inference (GB)", col(cnn, lambda r: _fmt(_mem(r), 2)),
         col(vit, lambda r: _fmt(_mem(r), 2))],
        ["pixel accuracy (mIoU)", col(cnn, lambda r: _fmt(_miou(r))), col(vit, lambda r: _fmt(_miou(r)))],
        ["data efficiency (training images)", col(cnn, lambda r: _fmt(r["train_samples"] or "all")),
         col(vit, lambda r: _fmt(r["train_samples"] or "all"))],
        ["interpretability (pointing game / energy in defect)",
         col(cnn, lambda r: ("Grad-CAM " + _loc_text(r)) if (r.get("interpretability") or {}).get("images") else "n/a"),
         col(vit, lambda r: ("attention " + _loc_text(r)) if (r.get("interpretability") or {}).get("images")
             else "n/a")],
    ])
    doc.heading("Claims checked on this data")
    doc.para("Accuracy claims compare two models on the same evaluation images with a paired bootstrap over the "
             "images (2000 resamples) of their mIoU difference: supported when its 95% interval lies above 0 and "
             f"the difference is at least claim_margin = {cfg.get('claim_margin', 0.01):.3f}; not supported when "
             "the whole interval lies below that margin (no gain worth the name, or a loss); inconclusive "
             "otherwise. The interval covers the choice of evaluation images, not the training seed: run the "
             "study with several `seeds` before trusting a close call.")
    doc.table(["claim", "verdict", "evidence"], claims(results, cfg.get("claim_margin", 0.01)))
    doc.heading("Accuracy against speed")
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    colors = {"CNN": "tab:blue", "ViT": "tab:red", "ViT-Hybrid": "tab:orange", "Swin": "tab:purple"}
    for r in results:
        ax.scatter(_speed(r), _miou(r), color=colors.get(r["family"], "gray"), s=40)
        ax.annotate(r["name"], (_speed(r), _miou(r)), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel(f"seconds per {cfg['speed_size'][1]}x{cfg['speed_size'][0]} image (tiled, median)")
    ax.set_ylabel("mIoU")
    ax.grid(alpha=0.3)
    for family, color in colors.items():
        ax.scatter([], [], color=color, label=family)
    ax.legend(fontsize=8)
    doc.image(fig, "accuracy_vs_speed.png", "mIoU against seconds per 4K image, one point per model")
    scored = [r for r in results if (r.get("interpretability") or {}).get("images")]
    if scored:
        doc.heading("Interpretability: where the models look")
        tol = cfg.get("interpret_tolerance")
        doc.para(f"ViTs: class-token attention of the last block; CNNs: Grad-CAM of the deepest encoder features. "
                 f"Pointing game: the map's maximum within {tol} px of a defect; energy: the share of the map within "
                 f"{tol} px of a defect (chance: that region's share of the image). Images larger than 512 px are "
                 "cropped to 512 px around a defect.")
        doc.table(["run", "family", "method", "images", "pointing game", "energy in defect", "chance"],
                  [[r["name"], r["family"], r["interpretability"]["method"], r["interpretability"]["images"],
                    _fmt(r["interpretability"]["pointing_game"], 2), _fmt(r["interpretability"]["energy_in_defect"], 2),
                    _fmt(r["interpretability"]["energy_chance"], 2)] for r in scored])
        if maps and any(maps.values()):
            doc.image(_maps_figure(maps), "saliency.png", "saliency maps (attention or Grad-CAM) with the true "
                      "defect outline")
    if overlays:
        doc.heading("Predictions on the largest images")
        for i, sample in enumerate(overlays):
            doc.image(_overlay_figure(sample, predictions, payload["classes"]), f"overlay_{i}.png",
                      f"{sample['key']}: full view (top) and a full-resolution zoom (bottom)")
    doc.heading("How this report was made")
    doc.code(payload.get("commands") or ["python -m evaluate run ..."])
    path = doc.write("defectforge: ViT or CNN on this data")
    _to_wandb(out, payload, doc)
    return path


def _to_wandb(out: Path, payload: dict, doc: Doc) -> None:
    cfg = payload["config"]
    if not cfg.get("wandb"):
        return
    import wandb

    from defectforge.tracking import wandb_init_kwargs

    kwargs = wandb_init_kwargs(out, name=cfg.get("name", "evaluate"), group=cfg.get("study"),
                               run_id=os.urandom(4).hex(), job_type="evaluate")
    run = wandb.init(project=cfg.get("wandb_project", "defectforge"), config=cfg, **kwargs)
    try:
        columns = ["run", "family", "model", "pretrained", "train_samples", "mIoU", "defect_mIoU", "ODS_F1",
                   "seconds_per_4k", "peak_memory_gb", "params_m"]
        table = wandb.Table(columns=columns)
        for r in payload["results"]:
            table.add_data(r["name"], r["family"], r["model"], r["pretrained"], r["train_samples"],
                           r["metrics"]["mIoU"], r["metrics"]["defect_mIoU"], r["metrics"]["ODS_F1"], _speed(r),
                           r["cost"]["tiled"]["peak_memory_bytes"] / GB, r["cost"]["parameters"] / 1e6)
        images = {p.stem: wandb.Image(str(p)) for p in sorted(out.glob("*.png"))}
        run.log({"results": table, **images})
    finally:
        run.finish()
