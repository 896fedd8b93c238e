"""tools/labels.place_labels: labels of crowded points and lines, none over another or over a
point, all inside the axes, checked on the drawn text boxes."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from mergekit_dam.tools.labels import place_labels  # noqa: E402


def overlap(a, b) -> float:
    return max(0.0, min(a.x1, b.x1) - max(a.x0, b.x0)) * max(0.0, min(a.y1, b.y1) - max(a.y0, b.y0))


def test_crowded_points_and_lines_get_labels_that_overlap_nothing():
    figure, axis = plt.subplots(figsize=(6, 4))
    # twelve points on top of each other in pairs, and two horizontal lines through them
    points = [(1.0 + 0.01 * (i // 2), 0.50 + 0.002 * i) for i in range(12)]
    axis.scatter(*zip(*points), s=20)
    axis.set_xlim(0.5, 1.5)
    axis.set_ylim(0.3, 0.7)
    items = [(x, y, f"merge_{i:02d}", "C0", "point") for i, (x, y) in enumerate(points)]
    items += [(None, 0.51, "line_a (no search)", "C1", "line"), (None, 0.505, "line_b (no search)", "C2", "line")]
    notes = place_labels(axis, items)
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    assert [n.get_text() for n in notes] and sorted(n.get_text() for n in notes) == sorted(item[2] for item in items)
    frame = axis.get_window_extent(renderer)
    boxes = [Text.get_window_extent(n, renderer) for n in notes]  # the text, without its leader line
    marks = [axis.transData.transform(p) for p in points]
    for i, a in enumerate(boxes):
        assert frame.x0 - 1 <= a.x0 and a.x1 <= frame.x1 + 1 and frame.y0 - 1 <= a.y0 and a.y1 <= frame.y1 + 1, notes[i].get_text()
        assert all(overlap(a, b) < 1.0 for b in boxes[i + 1:]), notes[i].get_text()
        assert not any(a.x0 + 1 < px < a.x1 - 1 and a.y0 + 1 < py < a.y1 - 1 for px, py in marks), notes[i].get_text()
    plt.close(figure)


def test_a_label_far_from_its_point_gets_a_leader_line_and_a_near_one_none():
    figure, axis = plt.subplots(figsize=(4, 3))
    axis.set_xlim(0, 2)
    axis.set_ylim(0, 1)
    notes = place_labels(axis, [(1.0, 0.5, f"m{i}", "C0", "point") for i in range(6)])
    leaders = [n.arrow_patch is not None for n in notes]
    assert leaders[0] is False and any(leaders)  # the first sits beside its point; crowding pushes others away
    plt.close(figure)
