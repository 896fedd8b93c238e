"""The lab's skills: generated prompt/answer pairs, each with one exact answer, and general
text from a small English grammar. The example space is partitioned by a hash of the
prompt (`split_of`), so held-out prompts never occur in fine-tuning, calibration or
validation data."""

from __future__ import annotations

import hashlib
import string
from typing import Callable, Dict, List, Tuple

import torch

SKILLS = ("arithmetic", "shift", "translate", "brackets")
SPLITS = ("train", "validation", "held_out")
WORDS = ["the", "a", "cat", "dog", "bird", "fish", "man", "woman", "child", "house", "tree", "river", "sees",
         "eats", "likes", "finds", "big", "small", "red", "old", "runs", "sleeps", "near", "under", "and"]



def _dictionary(seed: int) -> Dict[str, str]:
    """The invented language: one made-up word per English word."""
    generator = torch.Generator().manual_seed(seed + 7)
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    result, used = {}, set()
    for word in WORDS:
        while True:
            syllables = 1 + int(torch.randint(0, 2, (1,), generator=generator))
            made = "".join(consonants[int(torch.randint(0, 14, (1,), generator=generator))] + vowels[int(torch.randint(0, 5, (1,), generator=generator))] for _ in range(syllables))
            if made not in used:
                used.add(made)
                result[word] = made
                break
    return result


def _sentence(generator: torch.Generator) -> List[str]:
    def pick(options):
        return options[int(torch.randint(0, len(options), (1,), generator=generator))]

    words = [pick(["the", "a"]), pick(["big", "small", "red", "old", ""]), pick(["cat", "dog", "bird", "man", "woman", "child"])]
    words += [pick(["sees", "eats", "likes", "finds"]), pick(["the", "a"]), pick(["fish", "house", "tree", "river", "dog"])]
    if int(torch.randint(0, 3, (1,), generator=generator)) == 0:
        words += [pick(["near", "under"]), "the", pick(["house", "tree", "river"])]
    return [w for w in words if w]


def skill_generators(seed: int) -> Dict[str, Callable[[torch.Generator], Tuple[str, str]]]:
    """(prompt, answer) samplers per skill; answers are exact."""
    dictionary = _dictionary(seed)

    def pick(generator, n):
        return int(torch.randint(0, n, (1,), generator=generator))

    def arithmetic(g):  # two-digit addition without carries: learnable at this size
        digits = [(x, pick(g, 10 - x)) for x in (pick(g, 10), pick(g, 10))]
        a, b = "".join(str(x) for x, _ in digits), "".join(str(y) for _, y in digits)
        return f"{a}+{b}=", str(int(a) + int(b)).zfill(2)

    def shift(g):
        word = "".join(string.ascii_lowercase[pick(g, 26)] for _ in range(3 + pick(g, 4)))
        return f"{word}>", "".join(string.ascii_uppercase[(string.ascii_lowercase.index(c) + 1) % 26] for c in word)

    def translate(g):
        words = _sentence(g)[: 2 + pick(g, 4)]
        return " ".join(words) + "|", " ".join(dictionary[w] for w in words)

    def brackets(g):
        pairs = ["()", "[]", "{}", "<>"]
        opened = [pairs[pick(g, 4)] for _ in range(2 + pick(g, 4))]
        return "".join(p[0] for p in opened) + "~", "".join(p[1] for p in reversed(opened))

    return {"arithmetic": arithmetic, "shift": shift, "translate": translate, "brackets": brackets}


def split_of(prompt: str) -> str:
    """Hash partition of the prompt space: 80% train (fine-tuning + calibration), 10% each
    validation and held-out; a prompt belongs to exactly one split."""
    bucket = int(hashlib.sha256(prompt.encode()).hexdigest(), 16) % 10
    return "held_out" if bucket == 0 else "validation" if bucket == 1 else "train"


def sample(generator_fn, split: str, count: int, generator: torch.Generator, unique: bool = True) -> List[Tuple[str, str]]:
    examples, seen = [], set()
    attempts = 0
    while len(examples) < count:
        attempts += 1
        if attempts > count * 200:
            raise RuntimeError(f"lab: could not draw {count} distinct {split} examples")
        prompt, answer = generator_fn(generator)
        if split_of(prompt) != split or (unique and prompt in seen):
            continue
        seen.add(prompt)
        examples.append((prompt, answer))
    return examples


def general_text(generator: torch.Generator, count: int) -> List[str]:
    return [" ".join(_sentence(generator)) + "." for _ in range(count)]
