"""Bench tables and figures say what they hold (issue 13, item 8)."""
from __future__ import annotations

from rich.console import Console


def test_rich_table_shows_bracketed_labels_and_whole_headers():
    from bench.common import Column, rich_table

    rows = [{"label": "LESFT (Ours) [fp32]", "x": 1.0}, {"label": "LESFT (Ours) [bf16]", "x": 2.0}]
    cols = [Column("label", "framework"), Column("x", "of which client<->server MB", ".2f")]
    console = Console(width=40, record=True, color_system=None)
    console.print(rich_table(rows, cols, title="Table [2]"))
    text = console.export_text()
    assert "[fp32]" in text and "[bf16]" in text and "Table [2]" in text
    assert "…" not in text  # the header wraps instead of being cut


def test_overhead_plot_has_a_title(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.figure

    from bench import overhead

    rows = [{"row": "lesft@fp32", "mem_client_mb": 1.0, "mem_server_mb": 2.0}]
    seen = {}
    real = matplotlib.figure.Figure.savefig

    def spy(fig, *a, **k):
        seen["title"] = fig._suptitle.get_text() if fig._suptitle else ""
        seen["legends"] = len(fig.legends) + sum(ax.get_legend() is not None for ax in fig.axes)
        return real(fig, *a, **k)

    matplotlib.figure.Figure.savefig = spy
    try:
        overhead.plot(rows, tmp_path / "o.png", title="on arch:tiny-qwen2 (random weights)")
    finally:
        matplotlib.figure.Figure.savefig = real
    assert (tmp_path / "o.png").is_file()
    assert "arch:tiny-qwen2" in seen["title"]
    assert seen["legends"] == 1  # one figure legend, outside the axes
