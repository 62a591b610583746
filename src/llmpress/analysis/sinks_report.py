"""The attention-sink part of the analysis report: one headline sentence and one HTML section.

:mod:`.report` hands its table and image renderers in (``table``, ``img``), so this module
needs nothing from it.
"""

from __future__ import annotations

import html


def _g(v, nd: int = 3) -> str:
    return "-" if v is None else f"{v:.{nd}g}"


def ranges(xs: list[int]) -> str:
    """'1-3, 7' for [1, 2, 3, 7] (any order); '-' for none."""
    out: list[str] = []
    for x in sorted(xs):
        if out and isinstance(out[-1], list) and out[-1][1] == x - 1:
            out[-1][1] = x
        else:
            out.append([x, x])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in out) or "-"


def headline(s: dict) -> list[str]:
    """The sink findings in a few sentences ([] when the analysis skipped the attention view)."""
    a = s.get("attention_sinks")
    if not a or not a["top_layers"]:
        return []
    top = a["top_layers"][0]
    r = next(r for r in a["per_layer"] if r["layer"] == top["layer"])
    line = (
        f"Attention sink: queries give token 0 on average {_g(a['mass0_mean_all'])} of their attention over all layers and heads "
        f"(uniform causal attention: {_g(a['uniform_mass0'])}); most at layer {top['layer']} ({_g(r['mass0_mean'])} mean over heads, "
        f"head {r['mass0_max_head']} {_g(r['mass0_max'])})."
    )
    if a["sink_layers"]:
        line += f" Layers with >= {a['sink_mass']:g} of the mass on token 0: {ranges(a['sink_layers'])}."
    lines = [line]
    line = f"At token 0 of layer {top['layer']} the norms are {_g(r['q_ratio'])}x (q), {_g(r['k_ratio'])}x (k), {_g(r['v_ratio'])}x (v) the median of the other tokens."
    dp = a.get("dim_peak_mean")
    if dp:
        line += f" Over all tokens the largest dimension (mean |x|) is on average {_g(dp['q'])}x the median dimension in q, {_g(dp['k'])}x in k, {_g(dp['v'])}x in v."
    lines.append(line)
    link, pair = a["link"], a["link"].get("massive_pair_tok0")
    if pair:
        line = (
            f"Massive activations at token 0 are flagged from layer {link['first_massive_layer_tok0']} on (the largest: channel {pair['channel']}, "
            f"peak {_g(pair['max_abs'])}, layers {ranges(pair['layers'])})"
        )
        line += f"; token-0 attention first reaches {a['sink_mass']:g} at layer {link['onset_layer']}" if link["onset_layer"] is not None else ""
        line += f" (correlation over layers of log |h| at token 0 entering a layer and its mass on token 0: {_g(link['corr_log_h0_mass0'])})."
        lines.append(line)
    return lines


def html_section(s: dict, imgs: dict, *, table, img) -> list[str]:
    """The 'Attention sinks' section: what is measured, the per-layer table, the heat map."""
    a = s.get("attention_sinks")
    if not a:
        return []
    parts = [
        "<h2>Attention sinks</h2>",
        f"<p>Attention probabilities computed from the model's own q and k (after RoPE, grouped-query heads, causal mask and scaling). "
        f"Mass on token 0: mean over queries at positions &ge; {a['min_query']} and over the windows of p(query &rarr; key 0); "
        f"first {a['first_k']}: the same for keys 0..{a['first_k'] - 1}. Uniform causal attention would give token 0 {_g(a['uniform_mass0'])} "
        f"and the first {a['first_k']} {_g(a['uniform_first_k'])}. Norm ratio: |x| at token 0 / median |x| over the other tokens "
        "(q and k after RoPE, v; every head together). Dim peak: over tokens 1.., the mean |x| of the largest (head, dimension) over the median one "
        "(massive values concentrated in a few dimensions of q and k). |h| entering: max over channels of the residual entering the layer at token 0 "
        "(mean over windows), with the massive activation flagged there.</p>",
    ]
    parts += [f"<p>{html.escape(line)}</p>" for line in headline(s)]
    head = ["layer", "mass on token 0", "max head", "(head)", "min head", f"first {a['first_k']}", "q ratio", "k ratio", "v ratio", "q/k/v dim peak"]
    rows = [head + ["|h| entering (token 0)", "/ median", "massive entering"]]
    for r in a["per_layer"]:
        m = r.get("massive_in")
        keys = (
            "layer",
            "mass0_mean",
            "mass0_max",
            "mass0_max_head",
            "mass0_min",
            "first_k_mean",
            "q_ratio",
            "k_ratio",
            "v_ratio",
            "h0_in",
            "h0_in_over_median",
        )
        peaks = " / ".join(_g(r.get(f"{n}_dim_peak")) for n in "qkv")
        vals = [r[k] for k in keys]
        rows.append(vals[:9] + [peaks] + vals[9:] + [f"ch {m['channel']}: {_g(m['value'], 4)}" if m else ""])
    parts.append(table(rows))
    if "attention_sinks" in imgs:
        parts.append(img(imgs["attention_sinks"]))
    return parts
