"""The lab's skills (lab/skills.py): exact answers, and a prompt space split by hash."""

import torch

from mergekit_dam.lab.skills import SKILLS, general_text, sample, skill_generators, split_of


def test_every_skill_has_one_exact_answer_per_prompt():
    generators = skill_generators(0)
    assert tuple(generators) == SKILLS
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        prompt, answer = generators["arithmetic"](g)
        a, b = prompt.rstrip("=").split("+")
        assert int(answer) == int(a) + int(b)
        prompt, answer = generators["shift"](g)
        word = prompt.rstrip(">")
        assert answer == "".join(chr((ord(c) - ord("a") + 1) % 26 + ord("A")) for c in word)
        prompt, answer = generators["brackets"](g)
        pairs = {"(": ")", "[": "]", "<": ">", "{": "}"}
        assert answer == "".join(pairs[c] for c in reversed(prompt.rstrip("~")))


def test_samples_come_from_their_split_only_and_repeat_only_when_asked():
    draw = skill_generators(0)["arithmetic"]
    held = sample(draw, "held_out", 30, torch.Generator().manual_seed(0))
    assert all(split_of(prompt) == "held_out" for prompt, _ in held) and len({p for p, _ in held}) == 30
    assert {split_of(p) for p in (f"{a}+{b}=" for a in range(10, 60) for b in range(10, 30))} == {"train", "validation", "held_out"}


def test_general_text_is_sentences():
    texts = general_text(torch.Generator().manual_seed(0), 5)
    assert len(texts) == 5 and all(t.endswith(".") and " " in t for t in texts)
