"""The report's words: the headline, the protocol as text, the seed warning, the pairwise tests,
day and night mIoU and the fusion-quality-vs-mIoU section, as Markdown (from the numbers of
:mod:`pipelines.analysis`). The LaTeX tables are in :mod:`pipelines.report_tex`."""
from __future__ import annotations

import math

TEST_TEXT = ("paired permutation (sign-flip) test over test images, seeds pooled: the statistic is the "
             "difference of the two variants' mIoUs from their confusion matrices pooled over seeds and "
             "summed over images; the null arrangements swap the two variants' results on a random subset of images")


UNRESOLVED = ("The bootstrap interval excludes 0 but the test does not reject: treat the difference as "
              "unresolved. The test's null (the two variants exchangeable on every image) also shuffles "
              "per-class differences that cancel in the mIoU, which widens its null distribution; the "
              "percentile interval is narrower and ignores the Holm correction.")


def fmt_p(p: float | None) -> str:
    """A p-value for reading: 3 significant digits, ``< 0.0001`` below that, ``-`` when absent."""
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "-"
    return "< 0.0001" if p < 1e-4 else f"{p:.3g}"


def _r(v: float) -> str:
    return "-" if v is None or math.isnan(v) else f"{v:+.2f}"


def pm(mean: float, sd: float | None, nd: int = 3) -> str:
    if mean is None or math.isnan(mean):
        return "-"
    return f"{mean:.{nd}f}" + (f" ± {sd:.{nd}f}" if sd is not None and not math.isnan(sd) and sd > 0 else "")


def _verdict(p: dict, seeds: int) -> str:
    if not p["significant"]:
        return "no (within image noise)"
    if p["beyond_seeds"] is None:
        return "yes, over images (1 seed: seed noise unmeasured)"
    return "yes" if p["beyond_seeds"] else "no (within seed noise)"


def headline_markdown(a: dict) -> str:
    """The report's opening paragraph: the best variant, the best fused variant's gain over the
    better single modality with its interval, and whether the test finds it significant."""
    h = a.get("headline") or {}
    if not h:
        return "No segmentation results yet: nothing to conclude."
    m, sd = h["best_miou"]
    seeds = f"{h['seeds']} seed{'s' if h['seeds'] != 1 else ''}"
    out = [f"**Best variant: {h['best']}**, mIoU {pm(m, sd)} (mean ± sd over {seeds})."]
    if h.get("best_fused") and h.get("gain") and h.get("test"):
        g, t, base = h["gain"], h["test"], h["baseline"]
        lead = "It" if h["best_fused"] == h["best"] else f"No fused variant beats {h['best']}; the best fused, **{h['best_fused']}**,"
        if t["exceeds_noise"]:
            sig = "**significant**" + ("" if t["beyond_seeds"] else " over test images (one seed: seed noise unmeasured)")
        else:
            sig = "**not significant**: " + ("within test-image noise" if not t["significant"] else "within seed noise")
        out.append(f"{lead} gains **{g['gain']:+.3f}** mIoU over {base} (the better single modality), "
                   f"{int(g['level'] * 100)} % interval [{g['ci_low']:+.3f}, {g['ci_high']:+.3f}] "
                   f"(paired bootstrap over {g['n_images']} test images); the difference is {sig} "
                   f"(paired permutation test over test images, seeds pooled: p = {fmt_p(t['pvalue'])}, "
                   f"Holm-adjusted over {len(a['pairs'])} pairs p = {fmt_p(t['p_holm'])}).")
        if not t["significant"] and (g["ci_low"] > 0 or g["ci_high"] < 0):
            out.append(UNRESOLVED)
    elif h.get("baseline") is None:
        out.append("The single modalities (ir, vi) were not both segmented: no gain to report.")
    if a.get("max_seeds", 0) <= 1:
        out.append(seed_warning(a))
    return " ".join(out)


def seed_warning(a: dict) -> str:
    """The warning of a run with one segmentation seed (empty otherwise)."""
    if a.get("max_seeds", 0) > 1:
        return ""
    return ("**Warning: one segmentation seed.** The bootstrap interval and the permutation test cover "
            "only the sampling of test images, not seed-to-seed training noise, which is often as large "
            "as the differences between fusion methods (0.5-2 mIoU points); a variant can look "
            "significant by a lucky seed. Run `seg_seeds: [0, 1, 2]` before drawing conclusions.")


def protocol_markdown(proto: dict, data_text: str, fusion_parts: list[str], variants: list[str],
                      n_images: int, n_day: int, n_night: int) -> str:
    """The protocol as readable bullet points (``proto``: the segmentation protocol's keys, see
    :func:`pipelines.stages.segment.protocol_of`; ``fusion_parts``: one sentence per learned
    fusion variant: where its weights come from)."""
    g = proto.get
    weights = f"weights {g('encoder_weights')}" if g("encoder_weights") else "randomly initialised"
    frozen = (f", the first {g('frozen_epochs')} with the encoder frozen at batch {g('frozen_batch_size')}"
              if g("frozen_epochs") else "")
    world = g("world_size", 1)
    dn = f" ({n_day} day, {n_night} night)" if n_day or n_night else ""
    seeds = g("seg_seeds", [])
    lines = [
        f"- **Segmenter:** DeepLabV3+ with a {g('encoder')} encoder ({weights}), "
        f"{g('decoder_channels')} decoder channels, {'separable' if g('aspp_separable') else 'plain'} "
        "ASPP convolutions; Dice + cross-entropy loss.",
        f"- **Training:** SGD, learning rate {g('lr')} with cosine decay, {g('epochs')} epochs at batch "
        f"{g('batch_size')}{frozen}; random {g('crop_size')} px crops, scale range {g('scale_range')}; "
        f"{g('precision')}; {world} process{'es' if world != 1 else ''}.",
        f"- **Evaluation:** {n_images} test images{dn}; mIoU convention '{g('miou_convention')}': one "
        "confusion matrix over the test set, IoU averaged over the classes present.",
        f"- **Seeds:** {len(seeds)} segmentation seed{'s' if len(seeds) != 1 else ''} {list(seeds)} per "
        "variant; tables show the mean ± population sd over seeds.",
        f"- **Data:** {data_text}.",
        f"- **Variants:** {', '.join(variants)}.",
    ]
    lines += [f"- **{p.split(' ', 1)[0]}:** {p.split(' ', 1)[1]}." for p in fusion_parts if " " in p]
    lines.append(f"- **Tests:** {TEST_TEXT}; two-sided p-values, Holm-corrected over all pairs. A "
                 "difference exceeds the noise when its Holm-adjusted p < 0.05 and, with 2 or more "
                 "seeds, the difference of the seed means exceeds 2 standard errors of the seeds.")
    return "\n".join(lines)


def vs_baseline_markdown(a: dict) -> str:
    """Each variant against the better single modality: difference, p, Holm p, seed spread, verdict."""
    from pipelines.analysis import find_pair

    base = a.get("baseline")
    if base is None:
        return "The single modalities were not both segmented: no baseline to test against."
    lines = [f"Each variant against **{base}**, the better single modality (difference = variant - {base}, "
             "mIoU of the confusion matrices summed over seeds and images):", "",
             "| variant | difference | p | p (Holm) | seed-mean difference ± se | exceeds the noise |",
             "|---|---:|---:|---:|---:|---|"]
    for v in a["variants"]:
        p = find_pair(a["pairs"], v, base) if v != base else None
        if p is None:
            continue
        se = "" if math.isnan(p["seed_se"]) else f" ± {p['seed_se']:.3f}"
        lines.append(f"| {v} | {p['statistic']:+.3f} | {fmt_p(p['pvalue'])} | {fmt_p(p['p_holm'])} | "
                     f"{p['seed_diff']:+.3f}{se} | {_verdict(p, a['max_seeds'])} |")
    return "\n".join(lines)


def pair_matrix_markdown(a: dict) -> str:
    """All pairs as a matrix: cell (row r, column c) = mIoU(r) - mIoU(c), marked ``*`` where it
    exceeds the noise."""
    from pipelines.analysis import find_pair

    vs = a["variants"]
    if len(vs) < 2:
        return ""
    lines = [f"Every pair: row minus column mIoU; **bold with \\*** where the difference exceeds the noise "
             f"(Holm over {len(a['pairs'])} pairs, p < 0.05, and beyond seed noise); "
             f"{a['n_resamples']} random sign flips or all 2^n when fewer. Full list: tables/pairwise.csv.", "",
             "| row - column | " + " | ".join(vs) + " |", "|---|" + "---:|" * len(vs)]
    for r in vs:
        cells = []
        for c in vs:
            p = find_pair(a["pairs"], r, c) if r != c else None
            if p is None:
                cells.append("")
            else:
                s = f"{p['statistic']:+.3f}"
                cells.append(f"**{s}\\***" if p["exceeds_noise"] else s)
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def day_night_markdown(dn: dict, variants: list[str]) -> str:
    """Day and night mIoU per variant (mean ± sd over seeds)."""
    if not dn["rows"]:
        return ("The test image names carry no day/night mark (MSRS-style names end in D or N, "
                "e.g. 00012N.png): no day/night breakdown.")
    lines = [f"mIoU over the {dn['n_day']} day and the {dn['n_night']} night test images (file names ending "
             "in D or N), mean ± sd over seeds; night scenes are where infrared should matter.", "",
             "| variant | day | night | night - day |", "|---|---:|---:|---:|"]
    for v in variants:
        r = dn["rows"].get(v)
        if r is None:
            continue
        d, n = r.get("day", (math.nan, math.nan)), r.get("night", (math.nan, math.nan))
        gap = "-" if math.isnan(d[0]) or math.isnan(n[0]) else f"{n[0] - d[0]:+.3f}"
        lines.append(f"| {v} | {pm(*d)} | {pm(*n)} | {gap} |")
    return "\n".join(lines)


def correlation_markdown(c: dict) -> str:
    """Per fusion metric, Spearman and Kendall rank correlations with mIoU across the fused variants."""
    if not c["results"]:
        return c.get("note") or "No fusion quality metrics: nothing to correlate."
    lines = [f"Does a better fusion score predict a better segmentation? For each fusion quality metric, the "
             f"rank correlation between its test-set mean and the mean mIoU across the n = {c['n']} fused "
             f"variants ({', '.join(c['variants'])}); two-sided permutation p-values (all n! pairings when "
             "n <= 8), Holm over the metrics. For a lower-is-better metric a helpful metric correlates "
             "negatively."]
    if c.get("note"):
        lines += ["", f"**{c['note']}**"]
    lines += ["", "| metric | Spearman rho | p | p (Holm) | Kendall tau | p | p (Holm) | n | conclusion |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in c["results"]:
        s, k = r["spearman"], r["kendall"]
        name = r["metric"] + (" (lower better)" if r["lower_is_better"] else "")
        if not s["conclusive"]:
            concl = s["reason"]
        elif s["p_holm"] < 0.05:
            concl = "rank-correlated with mIoU"
        else:
            concl = "no evidence of a correlation"
        lines.append(f"| {name} | {_r(s['statistic'])} | {fmt_p(s['pvalue'])} | {fmt_p(s['p_holm'])} | "
                     f"{_r(k['statistic'])} | {fmt_p(k['pvalue'])} | {fmt_p(k['p_holm'])} | {s['n']} | {concl} |")
    return "\n".join(lines)


def summary_markdown(rows: list[dict], gains: list[dict], a: dict) -> str:
    """The table that answers the question, narrow enough for a laptop: per variant the mIoU
    (mean ± sd over seeds), the gain over the better single modality with its bootstrap interval,
    the Holm-adjusted p of the test against it and whether the difference exceeds the noise, and
    the day and night mIoU."""
    from pipelines.analysis import find_pair

    base = a.get("baseline")
    by = {g["variant"]: g for g in gains}
    dn = a.get("day_night", {}).get("rows", {})
    level = f"{int(gains[0]['level'] * 100)} % interval" if gains else "interval"
    lines = [f"| variant | mIoU | gain over {base or '-'} | {level} | p (Holm) | exceeds the noise | day | night |",
             "|---|---:|---:|---:|---:|---|---:|---:|"]
    best = max((round(r["miou"][0], 3) for r in rows), default=None)
    for r in rows:
        v = r["variant"]
        m = pm(*r["miou"])
        m = f"**{m}**" if best is not None and round(r["miou"][0], 3) == best else m
        g = by.get(v)
        t = find_pair(a.get("pairs", []), v, base) if base and v != base else None
        gain = f"{g['gain']:+.3f}" if g else f"{t['statistic']:+.3f}" if t else "-"   # vi: its test's difference
        ci = "-" if g is None else f"[{g['ci_low']:+.3f}, {g['ci_high']:+.3f}]"
        if v == base:
            gain, verdict = "baseline", ""
        else:
            verdict = "-" if t is None else ("**yes**" if t["exceeds_noise"] else "no")
        d, n = dn.get(v, {}).get("day", (math.nan, None)), dn.get(v, {}).get("night", (math.nan, None))
        lines.append(f"| {v} | {m} | {gain} | {ci} | {fmt_p(t['p_holm']) if t else '-'} | {verdict} | "
                     f"{pm(*d)} | {pm(*n)} |")
    return "\n".join(lines)
