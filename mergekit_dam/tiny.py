"""Tiny models of real architectures, built offline, for the demo and the tests.

A "family" is a random base model plus experts that are the base plus small,
independent perturbations, all saved as ordinary Hugging Face checkpoints
(config.json + model.safetensors + a character-level tokenizer), so mergekit and
transformers load them exactly like hub models.
"""

from __future__ import annotations

import os
import string
from typing import Dict, List

import torch

# Geometry of each family: small, but with the features that matter to merging
# (GQA, q/k/v biases, tied embeddings).
ARCHITECTURES: Dict[str, dict] = {
    "llama": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2),
    "mistral": dict(model_type="mistral", num_attention_heads=4, num_key_value_heads=2, sliding_window=None),
    "qwen2": dict(model_type="qwen2", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
}

CHARACTERS = string.ascii_letters + string.digits + string.punctuation + " \n"


def make_tokenizer():
    """A character-level fast tokenizer (no download): one id per printable character."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {token: index for index, token in enumerate(specials + list(CHARACTERS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()  # characters join back without spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def make_config(arch: str = "llama", *, hidden: int = 32, layers: int = 2, vocab: int = 0, tie: bool | None = None):
    from transformers import AutoConfig

    options = dict(ARCHITECTURES[arch])
    model_type = options.pop("model_type")
    if tie is not None:
        options["tie_word_embeddings"] = tie
    return AutoConfig.for_model(
        model_type,
        vocab_size=vocab or len(CHARACTERS) + 4,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **options,
    )


def _randomize(model: torch.nn.Module, generator: torch.Generator, scale: float) -> None:
    """Fill every parameter (norms and biases too) so merges are non-trivial everywhere."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator) * scale
            if "norm" in name:
                parameter.copy_(1.0 + noise)
            else:
                parameter.copy_(noise)


def _perturb(model: torch.nn.Module, generator: torch.Generator, scale: float) -> None:
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


def save_model(model, path: str, tokenizer=None) -> str:
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def make_family(
    root: str,
    arch: str = "llama",
    *,
    experts: int = 3,
    seed: int = 0,
    hidden: int = 32,
    layers: int = 2,
    tie: bool | None = None,
    spread: float = 0.05,
) -> List[str]:
    """Save `base` and `expert_1..N` under root; returns [base, expert_1, ...] paths."""
    from transformers import AutoModelForCausalLM

    generator = torch.Generator().manual_seed(seed)
    config = make_config(arch, hidden=hidden, layers=layers, tie=tie)
    tokenizer = make_tokenizer()
    base = AutoModelForCausalLM.from_config(config)
    _randomize(base, generator, scale=0.1)
    paths = [save_model(base, os.path.join(root, "base"), tokenizer)]
    for index in range(1, experts + 1):
        expert = AutoModelForCausalLM.from_config(config)
        expert.load_state_dict(base.state_dict())
        _perturb(expert, generator, scale=spread)
        paths.append(save_model(expert, os.path.join(root, f"expert_{index}"), tokenizer))
    return paths


# --- a tiny lab: experts fine-tuned from one base on clearly different skills ---------

SKILLS = ("arithmetic", "reverse", "brackets")


def skill_example(skill: str, generator: torch.Generator) -> str:
    """One line of a synthetic skill; every skill has its own alphabet and structure."""

    def pick(n: int) -> int:
        return int(torch.randint(0, n, (1,), generator=generator))

    if skill == "arithmetic":
        a, b = pick(50), pick(50)
        return f"{a}+{b}={a + b}"
    if skill == "reverse":
        word = "".join(string.ascii_lowercase[pick(26)] for _ in range(3 + pick(4)))
        return f"{word}>{word[::-1].upper()}"
    depth = 1 + pick(4)
    return "(" * depth + "[" + "#" * pick(4) + "]" + ")" * depth


def write_skill_data(path: str, skill: str, count: int, seed: int) -> str:
    import json

    generator = torch.Generator().manual_seed(seed)
    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(count):
            handle.write(json.dumps({"text": skill_example(skill, generator)}) + "\n")
    return path


def _fine_tune(model, tokenizer, skill: str, steps: int, seed: int) -> None:
    from mergekit_dam.data import collate

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        texts = [skill_example(skill, generator) for _ in range(16)]
        ids, mask = collate([tokenizer(t)["input_ids"] for t in texts], tokenizer.pad_token_id)
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def make_lab(root: str, *, seed: int = 0, hidden: int = 32, layers: int = 2, steps: int = 60, examples: int = 48) -> dict:
    """A base model and one expert per skill, fine-tuned from it, with calibration data.

    Returns {"base": path, "experts": [paths], "data": [calibration jsonl paths],
    "held_out": [jsonl paths drawn with other seeds]} (skills order).
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = make_config("llama", hidden=hidden, layers=layers)
    tokenizer = make_tokenizer()
    base = AutoModelForCausalLM.from_config(config)
    base_path = save_model(base, os.path.join(root, "base"), tokenizer)
    lab = {"base": base_path, "experts": [], "data": [], "held_out": []}
    for index, skill in enumerate(SKILLS):
        expert = AutoModelForCausalLM.from_config(config)
        expert.load_state_dict(base.state_dict())
        _fine_tune(expert, tokenizer, skill, steps, seed + index + 1)
        lab["experts"].append(save_model(expert, os.path.join(root, f"expert_{skill}"), tokenizer))
        lab["data"].append(write_skill_data(os.path.join(root, f"{skill}.jsonl"), skill, examples, seed + 100 + index))
        lab["held_out"].append(write_skill_data(os.path.join(root, f"{skill}.held_out.jsonl"), skill, 16, seed + 200 + index))
    return lab
