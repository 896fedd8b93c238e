"""Experts with nothing to learn from (training/answers.py), on examples tokenised the way
training tokenises them."""

import json

import pytest

from mergekit_dam.core.errors import DamError
from mergekit_dam.core.settings import ModelSettings
from mergekit_dam.lab.tiny import make_tokenizer
from mergekit_dam.training.answers import check_answers
from mergekit_dam.training.data import tokenize


def examples(tmp_path, records, max_length):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return tokenize(ModelSettings(dataset=str(path)), make_tokenizer(), "m", samples=100, max_length=max_length, seed=0)


def test_answers_cut_by_max_length_everywhere_stop_the_run_with_one_line(tmp_path):
    long = [{"prompt": "x" * 30, "response": "yes"} for _ in range(4)]
    with pytest.raises(DamError, match=r"expert m has no answer token to learn from: all 4 of its examples lose their answers "
                                       r"\(4 cut off by max_length 16\); raise max_length"):
        check_answers("m", examples(tmp_path, long, 16), 16)


def test_some_lost_answers_are_one_warning_with_the_count_and_share(tmp_path, caplog):
    records = [{"prompt": "x" * 30, "response": "yes"}, {"prompt": "ab", "response": ""}] + [{"prompt": "ab", "response": "cd"}] * 2
    counts = check_answers("m", examples(tmp_path, records, 16), 16)
    assert counts == {"examples": 4, "without_answer": 2, "cut_by_max_length": 1}
    assert "m: 2 of 4 examples (50%) have no answer token to learn from (1 cut off by max_length 16, 1 with an empty answer" in caplog.text


def test_plain_text_always_has_something_to_learn(tmp_path):
    assert check_answers("m", examples(tmp_path, [{"text": "x" * 40}], 16), 16)["without_answer"] == 0
