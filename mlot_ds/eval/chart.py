"""Horizontal bar charts of a report, one panel per metric, drawn with matplotlib.

    write_bar_chart("chart.png", [Panel("ROUGE-LSum (higher is better)", [Bar("SFT", 12.3, 0.4), ...])])

matplotlib is an optional extra (``pip install -e ".[report]"``, included in ``.[test]``); only the
reproduction's report draws charts, so nothing else imports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mlot_ds.errors import BadInput

PALETTE = ("#4272c4", "#ed7d31", "#70ad47", "#a569bd", "#5b9bd5", "#ffc000")


@dataclass
class Bar:
    label: str
    value: float
    spread: float = 0.0
    """Half length of the whisker (e.g. one standard deviation); 0 draws none."""
    group: int = 0
    """Colour index (e.g. 0 = baseline, 1 = MultiLevelOT)."""


@dataclass
class Panel:
    title: str
    bars: list[Bar] = field(default_factory=list)
    decimals: int = 2
    """Digits after the point of each bar's printed value."""


def write_bar_chart(path: str | Path, panels: list[Panel], *, bar_width: int = 360) -> Path:
    """Draw ``panels`` one under the other (a title, then one labelled bar per row) and save a PNG.

    Bars grow from a zero line (to the left for negative values, e.g. a difference to a baseline);
    each bar prints its value to ``panel.decimals`` digits. ``bar_width`` is the width of the bars'
    area in pixels (at 100 dpi).
    """
    if not any(panel.bars for panel in panels):
        raise ValueError("write_bar_chart: no bars to draw")
    try:
        # matplotlib is an optional extra: only report charts need it.
        import matplotlib

        matplotlib.use("Agg")  # no display: draw into a file
        from matplotlib import pyplot  # after use("Agg"), as matplotlib requires
    except ImportError:
        raise BadInput("the report chart needs matplotlib: pip install -e '.[report]'") from None
    rows = [len(panel.bars) for panel in panels]
    size = (bar_width / 100 + 4.5, 0.3 * sum(rows) + 0.8 * len(panels))
    figure, axes = pyplot.subplots(len(panels), 1, squeeze=False, figsize=size, gridspec_kw={"height_ratios": rows}, dpi=100)
    for axis, panel in zip(axes[:, 0], panels):
        labels = [bar.label for bar in panel.bars]
        positions = range(len(panel.bars))
        axis.barh(positions, [bar.value for bar in panel.bars], xerr=[bar.spread for bar in panel.bars],
                  color=[PALETTE[bar.group % len(PALETTE)] for bar in panel.bars], capsize=3)
        axis.axvline(0.0, color="#c8c8c8", linewidth=1)
        axis.set_yticks(list(positions), labels, fontsize=8)
        axis.invert_yaxis()
        axis.set_title(panel.title, fontsize=9, loc="left")
        for position, bar in zip(positions, panel.bars):
            axis.annotate(f"{bar.value:.{panel.decimals}f}", (bar.value, position), xytext=(4 if bar.value >= 0 else -4, 0),
                          textcoords="offset points", ha="left" if bar.value >= 0 else "right", va="center", fontsize=7)
        axis.margins(x=0.15)
        axis.tick_params(axis="x", labelsize=7)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    pyplot.close(figure)
    return path
