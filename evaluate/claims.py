"""The usual ViT-vs-CNN claims, decided from the typed results of one evaluation (evaluate/records.py).

Each claim is supported, not supported, inconclusive or not measured, with its evidence; `report.py` only
renders them. Rules (docs/evaluate.md, "The claims"):
- a claim picks its models from those that learned: within each family (CNN, ViT, ViT-Hybrid, Swin) a model
  that did not learn takes part only when no model of its family learned (`_learned_first`); a claim that
  then involves a model that did not learn is "inconclusive: <run> did not learn" (the models a claim
  involves are every model it picks from, e.g. every CNN and every ViT for "CNNs are faster"). Claims about a
  named pair (synthetic pretraining or not from the same starting weights, diffusion data or not) pick from every
  model;
- "pretrained ViTs win" compares pretrained against pretrained: the best pretrained ViT against the best
  pretrained CNN (published weights, synthetic pretraining or both), against the best CNN only when no CNN is
  pretrained;
- accuracy: a paired bootstrap over the evaluation images of the mIoU difference (`_better`);
- speed and memory: medians of interleaved timed runs; the order counts only when the two models'
  interquartile ranges do not overlap (`_order`), and needs at least two runs each;
- seams: the same model tiled with overlap 0 and with the configured overlap (`_seams`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from pretrain.models import VIT_FAMILIES

from .cost import quartiles
from .metrics import mean_difference, miou_difference
from .records import ModelResult, Timing

GB = 1024 ** 3
DIFFUSION_SOURCES = ("inpaint", "refine", "pretrained")  # `source` of shards made by a diffusion backend
SEAM_FREE = 1.1  # error near seams / elsewhere up to this counts as "no seam artefact"


@dataclass
class Claim:
    claim: str
    verdict: str  # supported | not supported | inconclusive[: why] | not measured
    evidence: str
    models: list[str] = field(default_factory=list)  # every model the claim involves


def _miou(r: ModelResult) -> float:
    return r.metrics.mIoU


def _best(pool: list[ModelResult], key: Callable[[ModelResult], float]) -> ModelResult | None:
    scored = [r for r in pool if key(r) is not None and not math.isnan(key(r))]
    return max(scored, key=key) if scored else None


def _of(results: list[ModelResult], families: tuple[str, ...] | str) -> list[ModelResult]:
    families = (families,) if isinstance(families, str) else families
    return [r for r in results if r.family in families]


def _learned_first(results: list[ModelResult]) -> list[ModelResult]:
    """Of the models a claim could pick from, those that learned, plus every model of a family in which none
    did (that family then takes part, and `_gate` makes the claim inconclusive rather than not measured)."""
    learned_families = {r.family for r in results if r.learned.learned}
    return [r for r in results if r.learned.learned or r.family not in learned_families]


def _better(a: ModelResult, b: ModelResult, what: str, margin: float) -> tuple[str, str]:
    """"a has a higher mIoU than b" by a paired bootstrap over the evaluation images: supported when the 95%
    interval of the difference lies above 0 and the difference is at least `margin`; not supported when the
    whole interval lies below `margin`; inconclusive otherwise."""
    ci = miou_difference(a.metrics.image_confusion, b.metrics.image_confusion)
    evidence = f"{what}: mIoU {_miou(a):.3f} vs {_miou(b):.3f}"
    if ci is None:  # no per-image confusions: the bare comparison
        return ("supported" if _miou(a) - _miou(b) >= margin else "not supported",
                evidence + f" (no per-image data for an interval; margin {margin:.3f})")
    if ci["low"] > 0 and ci["difference"] >= margin:
        verdict = "supported"
    elif ci["high"] < margin:
        verdict = "not supported"
    else:
        verdict = "inconclusive"
    return verdict, (f"{evidence}; difference {ci['difference']:+.4f}, 95% interval {ci['low']:+.4f} to "
                     f"{ci['high']:+.4f} (paired bootstrap over {ci['images']} images; a gain counts from "
                     f"{margin:.3f})")


def _order(a: list[float], b: list[float]) -> str:
    """"a is lower than b" from repeated measurements: supported / not supported when the medians differ and
    the interquartile ranges do not overlap, inconclusive otherwise (or with fewer than two runs each)."""
    if min(len(a), len(b)) < 2:
        return "inconclusive"
    (a1, am, a3), (b1, bm, b3) = quartiles(a), quartiles(b)
    if am < bm and a3 < b1:
        return "supported"
    if bm < am and b3 < a1:
        return "not supported"
    return "inconclusive"


def _spread(t: Timing) -> str:
    return f"median {t.seconds_per_image:.2f} s (IQR {t.seconds_q1:.2f}-{t.seconds_q3:.2f}, " \
           f"min-max {t.seconds_min:.2f}-{t.seconds_max:.2f}, {len(t.seconds_all)} runs)"


def memory_gb(t: Timing) -> list[float]:
    return [m / GB for m in t.memory_runs]


def _cost_claims(results: list[ModelResult]) -> list[Claim]:
    timed = _learned_first([r for r in results if r.cost is not None])
    cnns, vits = _of(timed, "CNN"), _of(timed, VIT_FAMILIES)
    names = [r.name for r in cnns + vits]
    if not cnns or not vits:
        return [Claim("CNNs are faster / lighter on 4K images", "not measured", "needs at least one CNN and one ViT",
                      names)]
    # speed: each model in its fastest runtime whose mIoU stayed within runtime_tolerance of eager torch
    c = min(cnns, key=lambda r: r.cost.fastest.seconds_per_image)
    v = min(vits, key=lambda r: r.cost.fastest.seconds_per_image)
    fc, fv = c.cost.fastest, v.cost.fastest
    speed = Claim("CNNs are faster on 4K images (claimed 0.3 vs 2.1 s)", _order(fc.seconds_all, fv.seconds_all),
                  f"fastest CNN {c.name} ({c.cost.deployed}) {_spread(fc)}; fastest ViT {v.name} ({v.cost.deployed}) "
                  f"{_spread(fv)}; each in its fastest runtime within runtime_tolerance of eager torch; timed in "
                  "alternation, the order counts when the interquartile ranges do not overlap", names)
    c = min(cnns, key=lambda r: r.cost.tiled.seconds_per_image)  # memory: eager PyTorch, as before
    v = min(vits, key=lambda r: r.cost.tiled.seconds_per_image)
    tc, tv = c.cost.tiled, v.cost.tiled
    mc, mv = memory_gb(tc), memory_gb(tv)
    memory = Claim("CNNs need less memory at 4K (claimed 8 vs 24 GB)", _order(mc, mv),
                   f"{c.name} median +{quartiles(mc)[1]:.2f} GB (max {max(mc):.2f}), {v.name} median "
                   f"+{quartiles(mv)[1]:.2f} GB (max {max(mv):.2f}) per tiled 4K inference ({tc.memory_kind}), "
                   "same rule as speed", names)
    return [speed, memory]


def _accuracy(title: str, a: ModelResult | None, b: ModelResult | None, what: str, pool: list[ModelResult],
              margin: float, missing: str) -> Claim:
    names = [r.name for r in pool]
    if a is None or b is None:
        return Claim(title, "not measured", missing, names)
    return Claim(title, *_better(a, b, what, margin), names)


def _named(r: ModelResult | None) -> str:
    return f"{r.name} (pretraining: {r.card.pretraining})" if r is not None else ""


def _accuracy_claims(results: list[ModelResult], margin: float) -> list[Claim]:
    out = []
    pre_vits = _learned_first([r for r in _of(results, VIT_FAMILIES) if r.card.pretrained])
    pre_cnns = [r for r in _of(results, "CNN") if r.card.pretrained]
    cnns = _learned_first(pre_cnns or _of(results, "CNN"))  # pretrained against pretrained, when there is one
    pv, cnn = _best(pre_vits, _miou), _best(cnns, _miou)
    out.append(_accuracy("Pretrained ViTs win on pixel accuracy", pv, cnn,
                         f"{_named(pv)} vs best {'pretrained ' if pre_cnns else ''}CNN {_named(cnn)}"
                         + ("" if pre_cnns else " (no CNN is pretrained here)"), pre_vits + cnns, margin,
                         "needs a pretrained ViT and a CNN"))
    # the same ViT with and without this study's synthetic pretraining, from the same starting weights (none, or the
    # same published ones), fine-tuned on as many images
    synthetic = _learned_first([r for r in _of(results, VIT_FAMILIES) if r.card.synthetic])
    pairs = [(p, s) for p in synthetic for s in _of(results, VIT_FAMILIES) if not s.card.synthetic
             and p.card.arch == s.card.arch and p.card.start == s.card.start
             and p.card.train_samples == s.card.train_samples]
    p, s = max(pairs, key=lambda ps: _miou(ps[0])) if pairs else (None, None)
    out.append(_accuracy("Synthetic pretraining (with CutMix) makes ViTs viable", p, s,
                         f"{_named(p)} vs {_named(s)}", list({r.name: r for pair in pairs for r in pair}.values()),
                         margin, "needs the same ViT with and without synthetic pretraining, from the same starting "
                         "weights"))
    hybrids, plains = _learned_first(_of(results, "ViT-Hybrid")), _learned_first(_of(results, "ViT"))
    h, v = _best(hybrids, _miou), _best(plains, _miou)
    out.append(_accuracy("ViT-Hybrid (conv stem) improves mIoU", h, v, f"{h.name if h else ''} vs "
                         f"{v.name if v else ''}", hybrids + plains, margin, "needs a ViT-Hybrid and a plain ViT"))
    sizes = sorted({r.card.train_samples for r in results if r.card.train_samples is not None})
    small = _learned_first([r for r in results if sizes and r.card.train_samples == sizes[0]])
    sc, sv = _best(_of(small, "CNN"), _miou), _best(_of(small, VIT_FAMILIES), _miou)
    title = f"CNNs win with little data ({sizes[0]} training images)" if sizes else "CNNs win with little data"
    missing = "no reduced training set in this evaluation" if not sizes else \
        f"needs a CNN and a ViT fine-tuned on the smallest subset ({sizes[0]} images)"
    out.append(_accuracy(title, sc, sv, f"{sc.name if sc else ''} vs {sv.name if sv else ''}",
                         _of(small, ("CNN", *VIT_FAMILIES)), margin, missing))
    return out


def _loc_text(r: ModelResult) -> str:
    i = r.interpretability
    return f"{i.pointing_game:.2f} / {i.energy_in_defect:.2f} (chance {i.energy_chance:.2f})"


def _attention_claim(results: list[ModelResult]) -> Claim:
    title = "Attention maps localize defects better than Grad-CAM"
    scored = _learned_first([r for r in results if r.interpretability is not None and r.interpretability.images])
    att = [r for r in scored if r.interpretability.method == "attention"]
    cam = [r for r in scored if r.interpretability.method == "grad-cam"]
    names = [r.name for r in att + cam]
    if not att or not cam:
        return Claim(title, "not measured", "needs a ViT and a CNN scored on images with defects "
                     "(interpret_images > 0)", names)

    def loc(r: ModelResult) -> tuple[float, float]:
        return r.interpretability.pointing_game, r.interpretability.energy_in_defect

    a, c = max(att, key=loc), max(cam, key=loc)
    evidence = f"pointing game / energy in defect: {a.name} attention {_loc_text(a)}, {c.name} Grad-CAM {_loc_text(c)}"
    ci = mean_difference(*[[float(s["hit"]) for s in r.interpretability.per_image] for r in (a, c)])
    if ci is None:  # no per-image scores: the bare comparison
        return Claim(title, "supported" if loc(a) > loc(c) else "not supported", evidence, names)
    verdict = "supported" if ci["low"] > 0 else "not supported" if ci["high"] <= 0 else "inconclusive"
    return Claim(title, verdict, evidence + f"; pointing-game difference {ci['difference']:+.2f}, 95% interval "
                 f"{ci['low']:+.2f} to {ci['high']:+.2f} (paired bootstrap over {ci['images']} images)", names)


def _seam_claim(results: list[ModelResult], overlap: float) -> Claim:
    """Each model tiled with overlap 0 and with `overlap`: an artefact at overlap 0 (error near seams over
    error elsewhere above SEAM_FREE) that the overlap brings to SEAM_FREE or below is removed."""
    title = "Tile overlap removes seam artifacts"
    pool = _learned_first([r for r in results
                           if r.metrics.seam_ratio is not None and r.metrics.seam_ratio_no_overlap is not None])
    names = [r.name for r in pool]
    if overlap <= 0:
        return Claim(title, "not measured", "overlap is 0 in this evaluation: nothing to compare", names)
    if not pool:
        return Claim(title, "not measured", "no image needed more than one tile", names)
    removed, remains, parts = 0, 0, []
    for r in pool:
        r0, r1 = r.metrics.seam_ratio_no_overlap, r.metrics.seam_ratio
        removed += r0 > SEAM_FREE >= r1
        remains += r0 > SEAM_FREE and r1 > SEAM_FREE
        parts.append(f"{r.name} {r0:.2f} -> {r1:.2f}")
    verdict = "not supported" if remains else "supported" if removed else "inconclusive"
    evidence = (f"error near seams / elsewhere, overlap 0 -> {overlap:.0%} on the {pool[0].metrics.seam_images} "
                f"tiled image(s): {', '.join(parts)} (1.0 = no seam effect; up to {SEAM_FREE} counts as none)")
    if not removed and not remains:
        evidence += "; no model shows a seam artefact without overlap, so there is nothing to remove"
    return Claim(title, verdict, evidence, names)


def _diffused(r: ModelResult) -> bool:
    return any(s in DIFFUSION_SOURCES for s in r.card.pretrain_sources or [])


def _diffusion_claim(results: list[ModelResult], margin: float) -> list[Claim]:
    pairs = [(d, p) for d in results for p in results if _diffused(d) and p.card.pretrain_sources and not _diffused(p)
             and d.card.arch == p.card.arch and d.card.start == p.card.start
             and d.card.train_samples == p.card.train_samples]
    if not pairs:  # only when the study pretrained the same model with and without diffusion data
        return []
    d, p = max(pairs, key=lambda dp: _miou(dp[0]))
    what = (f"{d.name} (pretrained on {' + '.join(d.card.pretrain_sources)}) vs {p.name} (pretrained on "
            f"{' + '.join(p.card.pretrain_sources)})")
    pool = list({r.name: r for pair in pairs for r in pair}.values())
    return [Claim("Diffusion-generated data improves synthetic pretraining", *_better(d, p, what, margin),
                  [r.name for r in pool])]


def _gate(claim: Claim, learned: dict[str, bool]) -> Claim:
    """A claim that involves a model that did not learn says so instead of a verdict."""
    failed = [n for n in claim.models if not learned.get(n, True)]
    if failed and claim.verdict != "not measured":
        claim.verdict = f"inconclusive: {', '.join(failed)} did not learn"
    return claim


def decide_claims(results: list[ModelResult], margin: float = 0.01, overlap: float = 0.1) -> list[Claim]:
    """The usual claims against this evaluation; `margin`: the smallest mIoU gain that counts as a win."""
    claims = [*_cost_claims(results), *_accuracy_claims(results, margin), _attention_claim(results),
              _seam_claim(results, overlap), *_diffusion_claim(results, margin)]
    learned = {r.name: r.learned.learned for r in results}
    return [_gate(c, learned) for c in claims]


# ------------------------------------------------------------- how the models see (evaluate/represent_run.py)

EARLY = 2  # "by layer 2"


def _global_early_claim(rep: dict) -> Claim:
    """Heads of a ViT's blocks 1-2 whose mean attention distance exceeds the first CNN's effective receptive field
    (gradient-weighted mean distance) at the same depth: supported when more than half of them do."""
    title = "ViT layers see globally early (Raghu et al.: by layer 2; CNNs need 5+ layers)"
    vits = [m for m in rep["models"] if m["attention_distance"]]
    cnns = [m for m in rep["models"] if m["receptive_field"]]
    names = [m["name"] for m in vits[:1] + cnns[:1]]
    if not vits or not cnns:
        return Claim(title, "not measured", "needs a ViT (or hybrid) and a CNN in `represent`", names)
    v, c = vits[0], cnns[0]
    fields = [f["mean_distance"] for f in c["receptive_field"]]
    heads = [(d, fields[min(i, len(fields) - 1)]) for i, layer in enumerate(v["attention_distance"][:EARLY])
             for d in layer]
    share = float(np.mean([d > f for d, f in heads]))
    widest = max(d for d, _ in heads)
    reach = next((i + 1 for i, f in enumerate(fields) if f >= widest), None)
    evidence = (f"{share:.0%} of {v['name']}'s {len(heads)} heads in blocks 1-{EARLY} attend farther than "
                f"{c['name']}'s receptive field at the same depth (ViT head mean distances "
                f"{', '.join(f'{d:.1f}' for d, _ in heads)} px; CNN stages 1-{EARLY}: "
                f"{', '.join(f'{f:.1f}' for f in fields[:EARLY])} px, of {rep['crop']} px crops); the CNN's field "
                + (f"reaches the widest early head ({widest:.1f} px) at stage {reach}" if reach else
                   f"never reaches the widest early head ({widest:.1f} px) in its {len(fields)} stages"))
    return Claim(title, "supported" if share > 0.5 else "not supported", evidence, names)


def _spatial_output_claim(rep: dict, margin: float) -> Claim:
    """Last-block probe accuracy (balanced, chance 0.5) of a class-token ViT against an average-pooled one."""
    title = "CLS-trained ViTs keep spatial information at the output"
    probed = [m for m in rep["models"] if m["probe"] and m["kind"] == "classification"]
    token = [m for m in probed if m["global_pool"] == "token"]
    avg = [m for m in probed if m["global_pool"] == "avg"]
    if not token or not avg:
        return Claim(title, "not measured", "needs two classification-pretrained ViTs, one with global_pool=token "
                     "and one with global_pool=avg", [m["name"] for m in token + avg])
    t, a = token[0], avg[0]
    diff = t["probe"][-1] - a["probe"][-1]
    verdict = "supported" if diff >= margin else "not supported" if diff <= 0 else "inconclusive"
    evidence = (f"probe of each last-block patch token for its own patch's defect label (balanced accuracy, chance "
                f"0.50): {t['name']} (token) {t['probe'][-1]:.2f}, {a['name']} (avg) {a['probe'][-1]:.2f}, "
                f"difference {diff:+.2f} (a gain counts from {margin:.2f}); their best blocks "
                f"{max(t['probe']):.2f} and {max(a['probe']):.2f}")
    return Claim(title, verdict, evidence, [t["name"], a["name"]])


def represent_claims(rep: dict, margin: float = 0.05, learned: dict[str, bool] | None = None) -> list[Claim]:
    """The two claims of Raghu et al. that `represent` measures, gated like the others when `learned` is given."""
    claims = [_global_early_claim(rep), _spatial_output_claim(rep, margin)]
    return [_gate(c, learned or {}) for c in claims]
