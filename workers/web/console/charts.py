"""Small charts as inline SVG, drawn on the server: no script, no CDN, readable in print."""

from __future__ import annotations

from collections.abc import Sequence

from markupsafe import Markup, escape

WIDTH, HEIGHT, PAD = 600, 120, 28
COLOURS = ("#0b5cad", "#b3261e", "#2e7d32", "#8a5300", "#6a1b9a", "#00695c")


def line_chart(
    series: dict[str, Sequence[int | None]], *, title: str, first: str, last: str
) -> Markup:
    """One line per named series over the same buckets (a gap where a value is None), with
    the largest value on the y axis and the first and last bucket's labels under the x axis."""
    length = max((len(values) for values in series.values()), default=0)
    top = max((v for values in series.values() for v in values if v is not None), default=0)
    scale = max(top, 1)
    step = (WIDTH - 2 * PAD) / max(length - 1, 1)
    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT + 34}" role="img" aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
        f'<line x1="{PAD}" y1="{HEIGHT}" x2="{WIDTH - PAD}" y2="{HEIGHT}" stroke="#8a94a3"/>',
        f'<line x1="{PAD}" y1="8" x2="{PAD}" y2="{HEIGHT}" stroke="#8a94a3"/>',
        f'<text x="{PAD - 4}" y="14" text-anchor="end" font-size="11">{top}</text>',
        f'<text x="{PAD - 4}" y="{HEIGHT}" text-anchor="end" font-size="11">0</text>',
        f'<text x="{PAD}" y="{HEIGHT + 14}" font-size="11">{escape(first)}</text>',
        f'<text x="{WIDTH - PAD}" y="{HEIGHT + 14}" text-anchor="end" font-size="11">{escape(last)}</text>',
    ]  # fmt: skip
    legend_x = PAD
    for index, (name, values) in enumerate(series.items()):
        colour = COLOURS[index % len(COLOURS)]
        for run in _runs(values):
            points = " ".join(
                f"{PAD + i * step:.1f},{HEIGHT - (v / scale) * (HEIGHT - 12):.1f}" for i, v in run
            )
            if len(run) == 1:
                x, y = points.split(",")
                parts.append(f'<circle cx="{x}" cy="{y}" r="2" fill="{colour}"/>')
            else:
                parts.append(
                    f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2"/>'
                )
        parts.append(
            f'<rect x="{legend_x}" y="{HEIGHT + 22}" width="10" height="10" fill="{colour}"/>'
        )
        parts.append(
            f'<text x="{legend_x + 14}" y="{HEIGHT + 31}" font-size="11">{escape(name)}</text>'
        )
        legend_x += 14 + 7 * len(name) + 18
    parts.append("</svg>")
    return Markup("".join(parts))


def _runs(values: Sequence[int | None]) -> list[list[tuple[int, int]]]:
    """The unbroken stretches of a series: (bucket, value) pairs between the gaps."""
    runs: list[list[tuple[int, int]]] = [[]]
    for index, value in enumerate(values):
        if value is None:
            if runs[-1]:
                runs.append([])
            continue
        runs[-1].append((index, value))
    return [run for run in runs if run]
