"""PNG plots for the benchmarks, under benchmarks/plots/. matplotlib is optional (the `bench`
extra): without it a benchmark prints its table and says the plot was skipped."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

PLOTS = Path(__file__).resolve().parent / "plots"


def save_plot(name: str, draw: Callable[[Any], None], panels: int = 1) -> Path | None:
    """`draw(axes)` fills a figure of `panels` side-by-side axes (one axes when 1), saved as
    plots/<name>.png. Returns the path, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(plot {name}.png skipped: matplotlib not installed; pip install -e '.[bench]')")
        return None
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    draw(axes[0][0] if panels == 1 else list(axes[0]))
    fig.tight_layout()
    PLOTS.mkdir(exist_ok=True)
    path = PLOTS / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot: {path.relative_to(PLOTS.parent.parent)}")
    return path
