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
