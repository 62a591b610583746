"""Pictures of the analysis (PNG bytes, matplotlib Agg backend, no display needed)."""

from __future__ import annotations

import io
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .collect import HIST_BINS, HIST_RANGE, SITES, Collected  # noqa: E402

DPI = 90


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def surface3d(mat: torch.Tensor, title: str, tokens: int = 64, zlabel: str = "|activation|") -> bytes:
    """3D surface of |A| over token x channel (the first ``tokens`` tokens)."""
    a = mat[:tokens].abs().float().numpy()
    T, C = a.shape
    X, Y = np.meshgrid(np.arange(C), np.arange(T))
    fig = plt.figure(figsize=(6.2, 4.6))
    ax = fig.add_subplot(111, projection="3d")
    ax.plot_surface(X, Y, a, cmap="coolwarm", rstride=1, cstride=max(1, C // 256), linewidth=0, antialiased=False)
    t, c = np.unravel_index(int(a.argmax()), a.shape)
    ax.text(c, t, a[t, c], f"  {a[t, c]:.3g} (tok {t}, ch {c})", fontsize=8)
    ax.set_xlabel("channel")
    ax.set_ylabel("token")
    ax.set_zlabel(zlabel)
    ax.set_title(title, fontsize=10)
    ax.view_init(elev=25, azim=-60)
    return _png(fig)


def top_magnitudes(col: Collected, site: str = "resid", positions: list[int] | None = None) -> bytes:
    """Left: top-1/2/3 magnitudes and the median per layer (mean over sequences).
    Right: max |x| per layer at tracked token positions."""
    st = col.site(site)
    layers = sorted(st)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
    for k, style in zip(range(3), ("-o", "-s", "-^")):
        vals = [np.mean([s[k] for s in st[li].seq_topk if len(s) > k]) for li in layers]
        a1.plot(layers, vals, style, ms=3, label=f"top {k + 1}")
    a1.plot(layers, [st[li].median_abs for li in layers], "-", color="gray", label="median")
    a1.set_yscale("log")
    a1.set_xlabel("layer")
    a1.set_ylabel("|activation|")
    a1.set_title(f"top magnitudes across layers ({site})", fontsize=10)
    a1.legend(fontsize=8)
    n = max(st[layers[0]].n_seqs, 1) if layers else 1
    positions = positions if positions is not None else [0, 1]
    for p in positions:
        ys = [float(st[li].pos_absmax_sum[p]) / n if p < st[li].pos_absmax_sum.numel() else float("nan") for li in layers]
        a2.plot(layers, ys, "-o", ms=3, label=f"token {p}")
    others = [float(st[li].pos_absmax_sum.mean()) / n for li in layers]
    a2.plot(layers, others, "--", color="gray", label="mean over all positions")
    a2.set_yscale("log")
    a2.set_xlabel("layer")
    a2.set_ylabel("max |x| over channels")
    a2.set_title("tracked token positions (mean over sequences)", fontsize=10)
    a2.legend(fontsize=8)
    for ax in (a1, a2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return _png(fig)


def channel_heatmaps(col: Collected, sites: tuple[str, ...] = ("resid", "qkv_in", "o_in", "gate_up_in", "down_in", "down_out")) -> bytes:
    """Per-channel max |x| (log color) over layer x channel, one panel per site."""
    sites = tuple(s for s in sites if col.site(s))
    rows = math.ceil(len(sites) / 2)
    fig, axes = plt.subplots(rows, 2, figsize=(12, 2.9 * rows), squeeze=False)
    for ax, site in zip(axes.flat, sites):
        st = col.site(site)
        layers = sorted(st)
        m = torch.stack([st[li].ch_absmax for li in layers]).numpy()
        im = ax.imshow(
            np.maximum(m, 1e-3),
            aspect="auto",
            interpolation="nearest",
            norm=LogNorm(vmin=max(m[m > 0].min(), 1e-3) if (m > 0).any() else 1e-3, vmax=max(m.max(), 1e-2)),
            cmap="magma",
            origin="lower",
        )
        ax.set_title(f"{site}: per-channel max |x|", fontsize=9)
        ax.set_xlabel("channel")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax, fraction=0.03)
    for ax in list(axes.flat)[len(sites) :]:
        ax.axis("off")
    fig.tight_layout()
    return _png(fig)


def weight_outliers(column_absmax: dict[str, torch.Tensor]) -> bytes:
    """max |W[:, c]| per input column c, layer x column, for Wq, Wk, Wv."""
    roles = [r for r in ("q", "k", "v") if r in column_absmax and column_absmax[r].numel()]
    fig, axes = plt.subplots(1, len(roles), figsize=(4.2 * len(roles), 3.4), squeeze=False)
    for ax, r in zip(axes.flat, roles):
        m = column_absmax[r].numpy()
        im = ax.imshow(
            m, aspect="auto", interpolation="nearest", cmap="viridis", origin="lower", norm=LogNorm(vmin=max(m.min(), 1e-4), vmax=max(m.max(), 1e-3))
        )
        ax.set_title(f"W{r}: max |w| per input channel", fontsize=9)
        ax.set_xlabel("input channel")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    return _png(fig)


def weight_surface(w: torch.Tensor, title: str) -> bytes:
    return surface3d(w.abs().T.contiguous(), title, tokens=w.shape[1], zlabel="|w|")


def histograms(col: Collected, layer: int, sites: tuple[str, ...] = ("resid", "qkv_in", "gate_up_in", "down_in", "down_out")) -> bytes:
    """Histograms of log10 |x| (log counts) at one layer, one line per site."""
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    lo, hi = HIST_RANGE
    centers = np.linspace(lo, hi, HIST_BINS + 1)
    centers = (centers[:-1] + centers[1:]) / 2
    for site in sites:
        st = col.site(site).get(layer)
        if st is None:
            continue
        h = st.hist.numpy()
        ax.step(centers, np.where(h > 0, h, np.nan), where="mid", label=site)
    ax.set_yscale("log")
    ax.set_xlabel("log10 |x|")
    ax.set_ylabel("count")
    ax.set_title(f"distribution of |activation| at layer {layer} (log10 |x| < {lo:g} counted in the first bin)", fontsize=10)
    ax.legend(fontsize=8)
    return _png(fig)


def norm_trace(col: Collected, role: str, layer: int, channels: list[int]) -> bytes:
    """Per-channel mean |x| before the norm, after standardization, after the scale; and gamma."""
    names = (f"{role}_norm_in", f"{role}_norm_std", "qkv_in" if role == "attn" else "gate_up_in")
    sts = [col.site(n).get(layer) for n in names]
    if any(s is None for s in sts):
        return b""
    gamma = col.norm_gamma[role][layer].abs().numpy()
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.0))
    for ax, n, st in zip(axes, names, sts):
        v = st.channel_meanabs().numpy()
        ax.plot(v, lw=0.7)
        for c in channels:
            ax.annotate(str(c), (c, v[c]), fontsize=7, color="red")
        ax.set_title(f"{n} (layer {layer}): mean |x| per channel", fontsize=8)
        ax.set_xlabel("channel")
    axes[3].plot(gamma, lw=0.7, color="green")
    for c in channels:
        axes[3].annotate(str(c), (c, gamma[c]), fontsize=7, color="red")
    axes[3].set_title(f"|gamma| of the {role} norm (layer {layer})", fontsize=8)
    axes[3].set_xlabel("channel")
    fig.tight_layout()
    return _png(fig)


def difficulty_plot(act: dict[str, list[dict]], weights: dict[str, list]) -> bytes:
    """Per layer: max/median ratio and median effective int8 levels, activations and weights."""
    fig, axes = plt.subplots(2, 2, figsize=(12, 6.5))
    for site, rows in act.items():
        xs = [r["layer"] for r in rows]
        axes[0, 0].plot(xs, [r["max_over_median"] for r in rows], "-o", ms=2, label=site)
        axes[0, 1].plot(xs, [r["eff_levels_median"] for r in rows], "-o", ms=2, label=site)
    for role, rows in weights.items():
        xs = [i for i, r in enumerate(rows) if r]
        axes[1, 0].plot(xs, [rows[i]["max_over_median"] for i in xs], "-o", ms=2, label=f"W{role}")
        axes[1, 1].plot(xs, [rows[i]["eff_levels_median"] for i in xs], "-o", ms=2, label=f"W{role}")
    for ax, t in zip(
        axes.flat,
        (
            "activations: max / median |x|",
            "activations: median effective int8 levels per channel (per-tensor scale)",
            "weights: max / median |w|",
            "weights: median effective int8 levels per output row (per-tensor scale)",
        ),
    ):
        ax.set_title(t, fontsize=9)
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=6, ncol=3)
    fig.tight_layout()
    return _png(fig)


def superweight_profile(search: dict) -> bytes:
    """max |input| and max |output| of every down projection, per search iteration."""
    its = search.get("iterations") or []
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.5))
    for rec in its:
        lbl = f"iteration {rec['iteration']}"
        a1.plot(rec["down_in_max"], "-o", ms=2, label=lbl)
        a2.plot(rec["down_out_max"], "-o", ms=2, label=lbl)
    for ax, t in ((a1, "down_proj input: max |x| per layer"), (a2, "down_proj output: max |y| per layer")):
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(t, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def sink_heatmap(mass0: list[list[float]]) -> bytes:
    """Layers x heads heat map of the attention mass on token 0 (0..1), the values written in."""
    a = np.array(mass0, dtype=float)
    L, H = a.shape
    fig, ax = plt.subplots(figsize=(min(2.0 + 0.55 * H, 11), min(1.5 + 0.28 * L, 12)))
    im = ax.imshow(a, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    if L * H <= 600:
        for li in range(L):
            for h in range(H):
                ax.text(h, li, f"{a[li, h]:.2f}", ha="center", va="center", fontsize=6, color="black" if a[li, h] > 0.6 else "white")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("attention mass on token 0", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    return _png(fig)


def site_label(site: str) -> str:
    return SITES.get(site, site)
