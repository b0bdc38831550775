"""Matplotlib figures that need no torch: the Agg figure and PNG writer that gacq's plots share, and the plots that
`gacq report` draws from JSON alone (so that rendering a report does not import torch)."""

from __future__ import annotations

from pathlib import Path

from .utils import atomic_path


def figure(w: float = 6.4, h: float = 5.2):
    """A matplotlib Figure on the Agg canvas (no pyplot state, safe in any thread or without a display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path: Path) -> Path:
    """Write `fig` to `path` as PNG (atomically, see `atomic_path`)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path


def plot_gac_profiles(profiles: list[dict], path: str | Path, panels: list[str] | None = None) -> Path:
    """One line per checkpoint: GAC's mean relative sample weight per sampling step, averaged over blocks, with
    the range over blocks shaded. `panels` (one name per profile, e.g. its experiment) draws each name's profiles
    in a panel of its own, one under the other, with the legend beside it."""
    names = list(dict.fromkeys(panels)) if panels else [None]
    fig = figure(9.5 if panels else 7.0, 4.2 * len(names))
    for i, name in enumerate(names):
        ax = fig.add_subplot(len(names), 1, i + 1)
        for p in (p for j, p in enumerate(profiles) if not panels or panels[j] == name):
            line, = ax.plot(p["steps"], p["mean_over_blocks"], marker="o", ms=3, label=p["job"])
            ax.fill_between(p["steps"], p["min_over_blocks"], p["max_over_blocks"], color=line.get_color(),
                            alpha=0.12)
        ax.axhline(1.0, color="0.5", lw=0.8, ls="--")
        ax.set_xlabel("sampling step (0 = first, noisiest)")
        ax.set_ylabel("mean weight / uniform (training samples)")
        title = "GAC's learned sample weights per step: mean over blocks (shaded: min-max over blocks)"
        ax.set_title(f"{name}\n{title}" if name else title, fontsize=9)
        if panels:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        else:
            ax.legend(fontsize=7)
    if panels:
        fig.tight_layout()
    return save_png(fig, Path(path))
