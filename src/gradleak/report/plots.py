"""The report's pictures as PNG bytes: the privacy-utility plot (matplotlib, no display needed) and image
grids, and the data URIs that embed them in the page."""

from __future__ import annotations

import base64
import io
from typing import Any

from .verdicts import HIGH_REID, RECOGNISABLE_SKILL

_PALETTE = ["#2c6fbb", "#e67e22", "#27ae60", "#8e44ad", "#16a085", "#d35400", "#7f8c8d", "#2c3e50",
            "#c71585", "#b8860b"]


def data_uri(png: bytes) -> str:
    """A PNG as a ``data:`` URI (base64: no character of it needs escaping in HTML)."""
    return "data:image/png;base64," + base64.b64encode(png).decode()


def figure_png(fig) -> bytes:
    """A matplotlib figure as PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def image_png(img) -> bytes:
    """A Pillow image as PNG bytes."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _panel(ax, points: list[dict[str, Any]], key: str, ylabel: str, have_utility: bool,
           handles: dict[str, Any]) -> None:
    """One panel: ``key`` (SSIM skill or re-identification rate) against utility (or bits)."""
    k = 0
    for p in points:
        y = p[key] if p[key] is None else max(p[key], -1.0)
        x = p["auc"] if have_utility else p["bits"]
        base = p["setting"] == "none"
        color = "#c0392b" if base else _PALETTE[k % len(_PALETTE)]
        k += 0 if base else 1
        if y is None or x is None:
            continue
        h = ax.scatter([x], [y], s=230 if base else 70, marker="*" if base else "o", color=color,
                       edgecolor="black", linewidth=0.6, zorder=3 if base else 4, alpha=0.9)
        handles.setdefault("no protection" if base else p["label"], h)
    if have_utility:
        ax.set_xlabel("Model utility: ROC AUC on held-out patients\n(higher is better for the model)")
    else:
        ax.set_xscale("log")
        ax.set_xlabel("Bits per update (utility not measured in this run)")
    ax.set_ylabel(ylabel, fontsize=9)
    ys = [p[key] for p in points if p[key] is not None]
    ax.set_ylim(min([-0.05] + [max(y, -1.0) - 0.05 for y in ys]), 1.05)
    ax.grid(alpha=0.3)
    ax.axhspan(RECOGNISABLE_SKILL if key == "skill" else HIGH_REID, 1.05, color="#c0392b", alpha=0.06)


def privacy_utility_plot(points: list[dict[str, Any]]) -> bytes | None:
    """Leakage (y) against utility (x), one point per setting; the unprotected one marked. Each point holds
    ``setting``, ``label``, ``skill``, ``reid``, ``auc`` and ``bits``. None when nothing can be drawn."""
    from matplotlib.figure import Figure

    have_utility = any(p["auc"] is not None for p in points)
    if not points or not any((p["auc"] if have_utility else p["bits"]) is not None
                             and (p["skill"] is not None or p["reid"] is not None) for p in points):
        return None
    panels = [("skill", "Image leakage beyond the blind guess: SSIM gain\n(share of the gap between the blind "
                        "guess and the original; 1 = identical)")]
    if any(p["reid"] is not None for p in points):
        panels.append(("reid", "Patient re-identification rate, top-1\n(strongest ranking; see definitions)"))
    fig = Figure(figsize=(5.2 * len(panels), 4.4))
    handles: dict[str, Any] = {}
    for i, (key, ylabel) in enumerate(panels):
        _panel(fig.add_subplot(1, len(panels), i + 1), points, key, ylabel, have_utility, handles)
    extra_rows = (len(handles) - 1) // 3
    if handles:
        fig.legend(list(handles.values()), [t[:60] for t in handles], loc="lower center",
                   ncol=min(3, len(handles)), fontsize=8, frameon=False,
                   bbox_to_anchor=(0.5, -0.02 - 0.035 * extra_rows))
    fig.suptitle("Privacy vs. utility per defence setting (star: no protection; top = leaks more)", fontsize=10)
    fig.tight_layout(rect=(0, 0.04 + 0.035 * (extra_rows + 1), 1, 1))
    return figure_png(fig)
