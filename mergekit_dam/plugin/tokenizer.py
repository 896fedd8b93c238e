"""The tokenizer training feeds every input with: the skeleton model's, checked against the
others', with the config's chat template applied as mergekit applies it."""

from __future__ import annotations

from typing import Sequence

from mergekit_dam.core.errors import DamError
from mergekit_dam.plugin import host


def load_tokenizer(skeleton_model, rows: Sequence[object], config, trust_remote_code: bool):
    """The skeleton model's tokenizer; every input's tokenizer (where it has one) must
    have the same vocabulary, because one token sequence feeds all of them."""
    from transformers import AutoTokenizer

    def load(model):
        return AutoTokenizer.from_pretrained(model.model.path, revision=model.model.revision, trust_remote_code=trust_remote_code)

    try:
        tokenizer = load(skeleton_model)
    except Exception as error:
        raise DamError(f"dam: cannot load the tokenizer of {skeleton_model} ({error}); DAM training needs one") from None
    vocabulary = tokenizer.get_vocab()
    for model in rows:
        if model == skeleton_model:
            continue
        try:
            other = load(model).get_vocab()
        except Exception:
            continue  # no tokenizer files: the embedding shapes were already checked
        if other != vocabulary:
            raise DamError(
                f"dam: {model} has a different vocabulary than {skeleton_model} ({len(other)} vs {len(vocabulary)} "
                "tokens); DAM feeds one token sequence to every input, so their tokenizers must agree"
            )
    if config.chat_template:
        host.set_chat_template(tokenizer, config)
    return tokenizer
