"""Labels of points and lines in a chart panel, placed so that none overlaps another or a point
(the compare chart's compute panels: many models at close compute)."""

from __future__ import annotations

LABEL_SIZE = 8


def place_labels(axis, items) -> list:
    """Label points and horizontal lines so that no label overlaps another label or a point and
    every label stays inside the axes: for each item the first free place of a search outward
    (right of the point, left of it, then further up and down, with a leader line). `items`:
    (x or None for a line, y, text, colour, "point" | "line"). Returns the annotations."""
    from matplotlib.transforms import Bbox

    figure = axis.figure
    renderer = figure.canvas.get_renderer()
    frame = axis.get_window_extent(renderer)
    scale = 72.0 / figure.dpi
    anchors = []
    for x, y, text, colour, kind in items:
        if kind == "point":
            anchors.append(tuple(axis.transData.transform((x, y))))
        else:
            anchors.append((frame.x1, axis.transData.transform((1.0 if axis.get_xscale() == "log" else 0.0, y))[1]))
    obstacles = {i: Bbox.from_bounds(px - 6, py - 6, 12, 12) for i, ((px, py), item) in enumerate(zip(anchors, items)) if item[4] == "point"}
    placed: list = []
    annotations = []
    order = sorted(range(len(items)), key=lambda i: (items[i][4] != "point", -anchors[i][1], anchors[i][0]))
    for index in order:
        x, y, text, colour, kind = items[index]
        px, py = anchors[index]
        probe = axis.text(0, 0, text, fontsize=LABEL_SIZE)
        extent = probe.get_window_extent(renderer)
        probe.remove()
        w, h = extent.width + 2, extent.height + 1
        gap = 7
        sides = ("right", "left") if kind == "point" else ("left",)
        candidates = []
        for step in range(0, 40):
            for sign in ((0,) if step == 0 else (1, -1)):
                dy = sign * step * h * 0.55
                for side in sides:
                    x0 = px + gap if side == "right" else px - gap - w
                    candidates.append(Bbox.from_bounds(x0, py + dy - h / 2, w, h))
        inside = [c for c in candidates if c.x0 >= frame.x0 + 2 and c.x1 <= frame.x1 - 2 and c.y0 >= frame.y0 + 2 and c.y1 <= frame.y1 - 2]
        free = [c for c in inside if not any(c.overlaps(b) for b in placed)
                and not any(c.overlaps(b) for i, b in obstacles.items() if i != index)]
        choice = (free or inside or candidates)[0]
        placed.append(choice)
        offset = ((choice.x0 + 1 - px) * scale, (choice.y0 + 0.5 - py) * scale)
        leader = abs(choice.y0 + h / 2 - py) > h * 0.6
        xy, coords = ((x, y), "data") if kind == "point" else ((1.0, y), axis.get_yaxis_transform())
        note = axis.annotate(text, xy=xy, xycoords=coords, xytext=offset, textcoords="offset points", fontsize=LABEL_SIZE,
                             ha="left", va="bottom", color="black", zorder=6,
                             bbox=dict(boxstyle="square,pad=0.05", facecolor="white", edgecolor="none", alpha=0.75),
                             arrowprops=dict(arrowstyle="-", color=colour, linewidth=0.8, shrinkA=0, shrinkB=3) if leader else None)
        note.set_in_layout(False)
        annotations.append(note)
    axis._dam_annotations = annotations
    return annotations
