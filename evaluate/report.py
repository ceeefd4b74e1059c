"""The report: `report.md` and a self-contained `report.html` (images embedded), plus the same to W&B.

Every number comes from the typed records of this evaluation (evaluate/records.py, also written to
`results.json`); the claims are decided in evaluate/claims.py and only rendered here.
"""

from __future__ import annotations

import base64
import dataclasses
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
from pretrain.models import VIT_FAMILIES  # noqa: E402

from .claims import GB, memory_gb  # noqa: E402
from .config import EvalConfig  # noqa: E402
from .cost import quartiles  # noqa: E402
from .records import Evaluation, ModelResult  # noqa: E402


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


def _mem(r: ModelResult) -> float:
    """Median GB a model adds during one tiled 4K inference (CUDA: peak allocated; CPU: peak RSS over the RSS
    before the run)."""
    return quartiles(memory_gb(r.cost.tiled))[1]


def _speed(r: ModelResult) -> float:
    return r.cost.tiled.seconds_per_image


def _miou(r: ModelResult) -> float:
    return r.metrics.mIoU


def _best(results: list[ModelResult], families: tuple[str, ...]) -> ModelResult | None:
    pool = [r for r in results if r.family in families and not math.isnan(_miou(r))]
    return max(pool, key=_miou) if pool else None


def _loc_text(r: ModelResult) -> str:
    i = r.interpretability
    return f"{i.pointing_game:.2f} / {i.energy_in_defect:.2f} (chance {i.energy_chance:.2f})"


def _scored(r: ModelResult) -> bool:
    return r.interpretability is not None and bool(r.interpretability.images)


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


def confusions(results: list[ModelResult]) -> list[tuple[str, np.ndarray]]:
    """Each run's confusion matrix over every evaluation image (rows = true class, columns = predicted class, pixel
    counts), summed from its per-image matrices; runs evaluated without them are left out."""
    return [(r.name, np.asarray(r.metrics.image_confusion, dtype=np.float64).sum(0))
            for r in results if r.metrics.image_confusion]


def _shares(c: np.ndarray) -> np.ndarray:
    """A confusion matrix's rows as shares of each true class's pixels (NaN for a class with no pixel)."""
    totals = c.sum(1, keepdims=True)
    return np.divide(c, totals, out=np.full_like(c, np.nan), where=totals > 0)


def _confusion_section(doc: Doc, results: list[ModelResult], classes: list[str]) -> None:
    """Where each true class's pixels go: the share of its pixels predicted as each class, per run."""
    mats = confusions(results)
    if not mats:
        return
    doc.heading("Where each class's pixels go")
    doc.para("Rows: a run and the true class of a pixel, pooled over every evaluation image like the results table; "
             "columns: the share of those pixels the run predicts as each class (argmax; the diagonal is the "
             "recall). A class that a run never learned shows as a row whose pixels go to background; one mistaken "
             "for another shows off the diagonal. The figure gives the same shares.")
    rows = []
    for name, c in mats:
        share, totals = _shares(c), c.sum(1)
        rows += [[name, cls, str(int(totals[i])), *[_fmt(float(v)) for v in share[i]]]
                 for i, cls in enumerate(classes) if totals[i] > 0]
    doc.table(["run", "true class", "pixels", *[f"as {c}" for c in classes]], rows)
    doc.image(_confusion_figure(mats, classes), "confusion.png",
              "share of each true class's pixels (rows) predicted as each class (columns), per run")


def _confusion_figure(mats: list[tuple[str, np.ndarray]], classes: list[str]):
    k = len(classes)
    side = 0.45 * k + 1.4
    cols = min(3, len(mats))  # three runs to a row
    rows = math.ceil(len(mats) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(side * cols, side * rows), squeeze=False)
    for ax in axes.flat[len(mats):]:
        ax.axis("off")
    for ax, (name, c) in zip(axes.flat, mats, strict=False):
        share = _shares(c)
        ax.imshow(np.nan_to_num(share, nan=0.0), vmin=0, vmax=1, cmap="Blues")
        for i in range(k):
            for j in range(k):
                if not np.isnan(share[i, j]) and share[i, j] >= 0.005:
                    ax.text(j, i, f"{share[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if share[i, j] > 0.6 else "black")
        ax.set_xticks(range(k), classes, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(k), classes, fontsize=7)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
        ax.set_title(name, fontsize=8)
    fig.tight_layout()
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


def _results_table(doc: Doc, results: list[ModelResult], cfg: EvalConfig) -> None:
    rows = []
    for r in results:
        m, t = r.metrics, r.cost.tiled
        rows.append([r.name, r.family, r.card.model, r.card.pretraining,
                     _fmt(r.card.train_samples), "yes" if r.learned.learned else f"did not learn ({r.learned.reason})",
                     _fmt(m.mIoU), _fmt(m.defect_mIoU), _fmt(m.ODS_F1), _fmt(m.OIS_F1), _fmt(m.pixel_AP),
                     _fmt(m.image_AP), f"{_fmt(t.seconds_per_image, 2)} ({_fmt(t.seconds_q1, 2)}-"
                     f"{_fmt(t.seconds_q3, 2)}; {_fmt(t.seconds_min, 2)}-{_fmt(t.seconds_max, 2)})",
                     _fmt(t.tiles_per_s, 1), f"{_fmt(t.peak_memory_bytes / GB, 2)} (+{_fmt(_mem(r), 2)})",
                     _fmt(r.cost.parameters / 1e6, 1), _fmt(r.cost.gflops_per_tile, 1),
                     f"{_fmt(m.seam_ratio_no_overlap, 2)} -> {_fmt(m.seam_ratio, 2)}"])
    doc.table(["run", "family", "timm model", "pretraining", "train images", "learned", "mIoU", "defect mIoU",
               f"ODS F1 ({cfg.tolerance} px)", "OIS F1", "pixel AP", "image AP",
               "s / 4K image: median (IQR; min-max)", "tiles/s", "peak memory GB (+ median during inference)",
               "params (M)", "GFLOPs / tile", f"seam / other error, overlap 0 -> {cfg.overlap:.0%}"], rows)
    _source_table(doc, results)
    _runtime_table(doc, results, cfg)


def _source_table(doc: Doc, results: list[ModelResult]) -> None:
    """The accuracy of each evaluation source on its own (the table above pools every pixel, so the largest
    images weigh most): one row per run and source."""
    sources = list(dict.fromkeys(s for r in results for s in r.metrics.by_source))
    if len(sources) <= 1:
        return
    classes = list(next(iter(results[0].metrics.by_source.values()))["IoU"])[1:]
    rows = [[r.name, s, str(v["images"]), f"{v['pixels'] / 1e6:.2f}", _fmt(v["mIoU"]), _fmt(v["defect_mIoU"]),
             *[_fmt(v["IoU"][c]) for c in classes]]
            for r in results for s, v in r.metrics.by_source.items()]
    doc.para("Accuracy per evaluation source: the table above pools every pixel of every image, so the largest "
             "images (a 4K scene) weigh most; here each source is pooled on its own.")
    doc.table(["run", "evaluation source", "images", "pixels (M)", "mIoU", "defect mIoU",
               *[f"IoU {c}" for c in classes]], rows)


def _runtime_table(doc: Doc, results: list[ModelResult], cfg: EvalConfig) -> None:
    """One column per runtime measured: s / 4K image and the mIoU change from eager torch (at mixed_precision)."""
    names = list(dict.fromkeys(n for r in results for n in r.cost.runtimes))
    if len(names) <= 1:
        return

    def cell(r: ModelResult, name: str) -> str:
        e = r.cost.runtimes.get(name)
        if e is None or e.tiled is None:
            return "n/a"
        mark = "" if e.within_tolerance else " (outside tolerance)"
        return f"{_fmt(e.tiled.seconds_per_image, 2)} s, {_fmt(1 / e.tiled.seconds_per_image, 2)} FPS, " \
               f"mIoU {e.miou_change:+.4f}{mark}"

    doc.heading("Speed per runtime")
    doc.table(["run", *[f"{n}: s / 4K image, 4K FPS, mIoU change" for n in names], "fastest within tolerance"],
              [[r.name, *[cell(r, n) for n in names], r.cost.deployed] for r in results])
    doc.para(f"Each model through each runtime (docs/deploy.md), timed in alternation with the others. mIoU change: "
             f"the runtime's argmax against eager PyTorch fp32 over every evaluation image. The speed claim uses each "
             f"model's fastest runtime whose change stays within runtime_tolerance = {cfg.runtime_tolerance}.")
    doc.para(f"learned: a model whose defect mIoU is below learned_floor = {cfg.learned_floor:.3f}, or whose "
             "prediction is one class everywhere, did not learn; every claim that involves it is inconclusive.")


def _weights_table(doc: Doc, results: list[ModelResult]) -> None:
    """Where each model's starting weights came from: the Hub repository and revision loaded, or a local file."""
    if not any(r.card.weights for r in results):
        return
    doc.heading("Pretrained weights")
    rows = []
    for r in results:
        w = r.card.weights or {}
        source = f"{w['repo_id']} @ {str(w.get('revision'))[:12]}, {w.get('file')}" if w.get("repo_id") else \
            w.get("path", "none (random initialisation)")
        rows.append([r.name, r.card.pretraining, source, w.get("license") or "n/a"])
    doc.table(["run", "pretraining", "weights (Hugging Face repository @ revision, or file)", "licence"], rows)
    doc.para("Published weights were loaded through the Hugging Face Hub cache with `pretrained: true`; "
             "\"synthetic (this study)\" is the synthetic pretraining run a model was initialised from. Each model "
             "was normalised with the mean/std of its weights' timm config.")


def _tradeoff_table(doc: Doc, results: list[ModelResult]) -> None:
    cnn, vit = _best(results, ("CNN",)), _best(results, VIT_FAMILIES)

    def col(r: ModelResult | None, fn) -> str:
        return "n/a" if r is None else fn(r)

    def interp(method: str):
        return lambda r: f"{method} {_loc_text(r)}" if _scored(r) else "n/a"

    doc.table(["aspect", f"CNN ({cnn.name if cnn else 'none'})", f"ViT ({vit.name if vit else 'none'})"], [
        ["4K inference speed (s / image, median)", col(cnn, lambda r: _fmt(_speed(r), 2)),
         col(vit, lambda r: _fmt(_speed(r), 2))],
        ["4K frames per second (fastest runtime within tolerance)",
         col(cnn, lambda r: f"{_fmt(1 / r.cost.fastest.seconds_per_image, 2)} ({r.cost.deployed})"),
         col(vit, lambda r: f"{_fmt(1 / r.cost.fastest.seconds_per_image, 2)} ({r.cost.deployed})")],
        ["memory during tiled 4K inference (GB)", col(cnn, lambda r: _fmt(_mem(r), 2)),
         col(vit, lambda r: _fmt(_mem(r), 2))],
        ["pixel accuracy (mIoU)", col(cnn, lambda r: _fmt(_miou(r))), col(vit, lambda r: _fmt(_miou(r)))],
        ["data efficiency (training images)", col(cnn, lambda r: _fmt(r.card.train_samples or "all")),
         col(vit, lambda r: _fmt(r.card.train_samples or "all"))],
        ["interpretability (pointing game / energy in defect)", col(cnn, interp("Grad-CAM")),
         col(vit, interp("attention"))],
    ])


def _claims_section(doc: Doc, evaluation: Evaluation) -> None:
    cfg = evaluation.config
    doc.heading("Claims checked on this data")
    doc.para("Accuracy claims compare two models on the same evaluation images with a paired bootstrap over the "
             "images (2000 resamples) of their mIoU difference: supported when its 95% interval lies above 0 and "
             f"the difference is at least claim_margin = {cfg.claim_margin:.3f}; not supported when the whole "
             "interval lies below that margin (no gain worth the name, or a loss); inconclusive otherwise. The "
             "interval covers the choice of evaluation images, not the training seed: run the study with several "
             "`seeds` before trusting a close call. Speed and memory: the models are timed in alternation "
             f"({cfg.repeats} rounds); the order counts only when the interquartile ranges of the two models do "
             "not overlap. Seams: each model is also tiled without overlap on the tiled images. A claim that "
             "involves a model that did not learn is inconclusive.")
    doc.table(["claim", "verdict", "evidence"], [[c.claim, c.verdict, c.evidence] for c in evaluation.claims])


def _speed_figure(doc: Doc, results: list[ModelResult], cfg: EvalConfig) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    colors = {"CNN": "tab:blue", "ViT": "tab:red", "ViT-Hybrid": "tab:orange", "Swin": "tab:purple"}
    for r in results:
        t = r.cost.tiled
        ax.errorbar(_speed(r), _miou(r), xerr=[[_speed(r) - t.seconds_q1], [t.seconds_q3 - _speed(r)]],
                    color=colors.get(r.family, "gray"), fmt="o", ms=6, capsize=3)
        ax.annotate(r.name, (_speed(r), _miou(r)), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel(f"seconds per {cfg.speed_size[1]}x{cfg.speed_size[0]} image (tiled, median and IQR)")
    ax.set_ylabel("mIoU")
    ax.grid(alpha=0.3)
    for family, color in colors.items():
        ax.scatter([], [], color=color, label=family)
    ax.legend(fontsize=8)
    doc.image(fig, "accuracy_vs_speed.png", "mIoU against seconds per 4K image, one point per model")


def _interpret_section(doc: Doc, results: list[ModelResult], cfg: EvalConfig, maps: dict | None) -> None:
    scored = [r for r in results if _scored(r)]
    if not scored:
        return
    doc.heading("Interpretability: where the models look")
    tol = cfg.interpret_tolerance
    doc.para(f"ViTs: class-token attention of the last block; CNNs: Grad-CAM of the deepest encoder features. "
             f"Pointing game: the map's maximum within {tol} px of a defect; energy: the share of the map within "
             f"{tol} px of a defect (chance: that region's share of the image). Images larger than 512 px are "
             "cropped to 512 px around a defect.")
    doc.table(["run", "family", "method", "images", "pointing game", "energy in defect", "chance"],
              [[r.name, r.family, r.interpretability.method, r.interpretability.images,
                _fmt(r.interpretability.pointing_game, 2), _fmt(r.interpretability.energy_in_defect, 2),
                _fmt(r.interpretability.energy_chance, 2)] for r in scored])
    if maps and any(maps.values()):
        doc.image(_maps_figure(maps), "saliency.png", "saliency maps (attention or Grad-CAM) with the true "
                  "defect outline")


def precision_note(precision: dict | None) -> str:
    """How the tiled passes ran: "fp32", or "bf16 autocast (mixed_precision=auto: measured 1.94x fp32 on this
    CPU)"."""
    if not precision:
        return "fp32"
    used = {"no": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}.get(precision.get("used"), "fp32")
    if precision.get("asked") != "auto":
        return f"{used} (mixed_precision={precision.get('asked')})"
    if "bf16_speedup" in precision:
        return (f"{used} (mixed_precision=auto: bf16 measured {precision['bf16_speedup']:.2f}x fp32 on this CPU, "
                f"used from {precision.get('min_speedup', 1.2)}x)")
    return f"{used} (mixed_precision=auto on {precision.get('device', 'this device')})"


def _damage_note(damage: dict | None) -> str:
    """The data line's account of damaged data left out (allow_damaged); empty when everything was read."""
    if not damage:
        return ""
    return (f" Damaged data left out (allow_damaged): {damage['skipped_samples']} sample(s) skipped; "
            f"{'; '.join(damage['problems'])}.")


def _grid_note(results: list[ModelResult], tile: int) -> str:
    """The data line's warning for ViTs tiled at another size than the crops they were trained on: their position
    embeddings are resampled to a token grid they never saw (measured in docs/evaluate.md, "Tile size")."""
    off = [f"{r.name} ({r.card.crop_size} px)" for r in results if r.card.grid_mismatch(tile)]
    if not off:
        return ""
    return (f" Trained on crops of another size than the {tile} px tiles: {', '.join(off)}; a ViT tiled so sees a "
            "token grid it was not trained on (tile_size equal to the training crop measured better for ViTs, "
            "docs/evaluate.md).")


def write_report(out: Path, evaluation: Evaluation, overlays: list[dict], predictions: dict[str, dict],
                 maps: dict[str, list] | None = None, represent_maps: dict | None = None) -> Path:
    results, cfg = evaluation.results, evaluation.config
    doc = Doc(out)
    doc.para(f"Generated {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} on {machine()}; device "
             f"{evaluation.device}, {precision_note(evaluation.precision)}. Data: {evaluation.images} images from "
             f"{', '.join(evaluation.sources)}; classes "
             f"{', '.join(evaluation.classes)}. Tiles {cfg.tile_size} px, overlap {cfg.overlap:.0%}, "
             f"{cfg.blend} blending. Speed: median of {cfg.repeats} timed runs per model on "
             f"{cfg.speed_size[1]}x{cfg.speed_size[0]} images ({results[0].cost.tiled.source})."
             + _grid_note(results, cfg.tile_size) + _damage_note(evaluation.data_damage))
    doc.heading("Results per model")
    _results_table(doc, results, cfg)
    _weights_table(doc, results)
    doc.heading("Per class")
    doc.table(["run", "class", "IoU", "Dice", "precision", "recall"],
              [[r.name, name, _fmt(v["IoU"]), _fmt(v["Dice"]), _fmt(v["precision"]), _fmt(v["recall"])]
               for r in results for name, v in r.metrics.per_class.items()])
    _confusion_section(doc, results, evaluation.classes)
    doc.heading("The usual ViT-vs-CNN trade-off, measured")
    _tradeoff_table(doc, results)
    _claims_section(doc, evaluation)
    doc.heading("Accuracy against speed")
    _speed_figure(doc, results, cfg)
    _interpret_section(doc, results, cfg, maps)
    if evaluation.represent is not None:
        from .represent_report import represent_section  # it draws with this module's Doc

        represent_section(doc, evaluation.represent, represent_maps or {})
    if overlays:
        doc.heading("Predictions on the largest images")
        for i, sample in enumerate(overlays):
            doc.image(_overlay_figure(sample, predictions, evaluation.classes), f"overlay_{i}.png",
                      f"{sample['key']}: full view (top) and a full-resolution zoom (bottom)")
    doc.heading("How this report was made")
    doc.code(evaluation.commands or ["python -m evaluate run ..."])
    path = doc.write("defectforge: ViT or CNN on this data")
    _to_wandb(out, evaluation)
    return path


def _to_wandb(out: Path, evaluation: Evaluation) -> None:
    cfg = evaluation.config
    if not cfg.wandb:
        return
    import wandb

    from defectforge.tracking import wandb_init_kwargs

    kwargs = wandb_init_kwargs(out, name=cfg.name, group=cfg.study, run_id=os.urandom(4).hex(), job_type="evaluate")
    run = wandb.init(project=cfg.wandb_project, config=dataclasses.asdict(cfg), **kwargs)
    try:
        columns = ["run", "family", "model", "pretraining", "train_samples", "learned", "mIoU", "defect_mIoU",
                   "ODS_F1", "seconds_per_4k", "seconds_q1", "seconds_q3", "peak_memory_gb", "params_m"]
        table = wandb.Table(columns=columns)
        for r in evaluation.results:
            t = r.cost.tiled
            table.add_data(r.name, r.family, r.card.model, r.card.pretraining, r.card.train_samples,
                           r.learned.learned, r.metrics.mIoU, r.metrics.defect_mIoU, r.metrics.ODS_F1,
                           t.seconds_per_image, t.seconds_q1, t.seconds_q3, t.peak_memory_bytes / GB,
                           r.cost.parameters / 1e6)
        claims = wandb.Table(columns=["claim", "verdict", "evidence"],
                             data=[[c.claim, c.verdict, c.evidence] for c in evaluation.claims])
        images = {p.stem: wandb.Image(str(p)) for p in sorted(out.glob("*.png"))}
        run.log({"results": table, "claims": claims, **images})
    finally:
        run.finish()
