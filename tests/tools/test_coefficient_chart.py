"""tools/coefficient_chart: the chart of inspect's distinction statistics over several runs."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mergekit_dam.tools.coefficient_chart import distinction_chart  # noqa: E402


def test_the_distinction_chart_writes_every_statistic_in_its_cell(tmp_path, monkeypatch):
    drawn, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda figure=None: drawn.append(figure))  # keep the figure to read it
    runs = [("four", {"spread": 1.2, "correlation": -0.2, "dominance": {"expert_a": 0.5, "expert_b": 0.4, "base": 0.1}}),
            ("weights", {"spread": 0.6, "correlation": None, "dominance": {"expert_a": 0.6, "expert_b": 0.4}})]
    path = distinction_chart(runs, str(tmp_path / "d.png"), "title", groups=[1])
    with open(path, "rb") as handle:
        assert handle.read(4) == b"\x89PNG"
    dominance, spread, correlation = drawn[0].axes[:3]
    # rows are the runs, columns the experts then the base; a model a run did not merge: a dash
    assert [t.get_text() for t in dominance.texts] == ["0.50", "0.40", "0.10", "0.60", "0.40", "–"]
    assert [t.get_text() for t in dominance.get_xticklabels()] == ["a", "b", "base"]
    assert [t.get_text() for t in dominance.get_yticklabels()] == ["four", "weights"]
    assert [t.get_text() for t in spread.texts] == ["1.20", "0.60"]
    assert [t.get_text() for t in correlation.texts] == ["-0.20", "–"]
    close(drawn[0])
