"""Test helpers for running mergekit 0.1.5's upstream test suite.

The mergekit 0.1.5 sdist on PyPI ships its ``tests/`` folder but not the
``tests/common.py`` helper module that those tests import from (nor
``tests/__init__.py``). This module is our own, independent implementation of
that helper API so that ``.ci/mergekit_suite.sh`` can copy it into the
extracted sdist as ``tests/common.py`` and run mergekit's own suite against the
*installed* mergekit (i.e. with the mergekit-dam plugin installed alongside).

It is not collected by our own test suite (its name does not match
``test_*.py``) and does not import anything from mergekit-dam.

Provided API (the names and signatures the upstream tests rely on):

* ``make_picollama(path, vocab_size=64)`` - tiny random ``LlamaForCausalLM``
  (hidden size 32, untied ``lm_head``).
* ``make_gpt2size(path)`` - tiny random ``GPT2LMHeadModel`` with 12 layers
  (the upstream tests slice ``layer_range=[0, 12]``).
* ``make_picogranite(path)`` - tiny random ``GraniteForCausalLM``.
* ``make_picoLlaVa(path)`` - tiny random ``LlavaForConditionalGeneration``
  (Llama text tower + CLIP vision tower).
* ``run_and_check_merge(config, ...)`` - run a merge into a temporary
  directory, sanity check the output, then call an optional ``validate``
  callback with the output directory path (a ``str``).

Every ``make_*`` function writes ``config.json`` plus safetensors weights to
``path`` (created if needed) and returns ``path`` as a ``str``. Weights are
float32 and randomly initialised, so two calls produce different models.
Nothing here touches the network.
"""

import os
import tempfile
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from mergekit.architecture import arch_info_for_config, get_architecture_info
from mergekit.architecture.auto import infer_architecture_info
from mergekit.common import ModelReference
from mergekit.config import MergeConfiguration
from mergekit.io import LazyTensorLoader
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from safetensors.torch import save_file
from transformers import (
    AutoConfig,
    CLIPVisionConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PretrainedConfig,
    PreTrainedModel,
)

PathLike = Union[str, os.PathLike]

# Sizes shared by the tiny decoder-only models. HIDDEN_SIZE is load bearing:
# test_embedding_truncation.py asserts embeddings of shape (vocab, 32).
HIDDEN_SIZE = 32
INTERMEDIATE_SIZE = 48
NUM_HEADS = 4
NUM_KV_HEADS = 2
NUM_LAYERS = 2
MAX_POSITIONS = 128
DEFAULT_VOCAB = 64


def _save(
    model_cls: type,
    config: PretrainedConfig,
    path: PathLike,
    in_memory_keys: bool = False,
) -> str:
    """Instantiate ``model_cls`` randomly from ``config`` and save it to ``path``.

    With ``in_memory_keys`` the weights are written under the model's own
    ``state_dict()`` names instead of whatever legacy on-disk layout
    ``save_pretrained`` converts them back to (transformers still loads both).
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        model: PreTrainedModel = model_cls(config)
        model = model.to(torch.float32)
    if in_memory_keys:
        model.config.save_pretrained(str(out))
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        model.save_pretrained(str(out), safe_serialization=True)
    del model
    return str(out)


# Geometry shared by the Llama-like decoders (Llama, Granite, LLaVA's text model).
_DECODER = dict(
    hidden_size=HIDDEN_SIZE,
    intermediate_size=INTERMEDIATE_SIZE,
    num_hidden_layers=NUM_LAYERS,
    num_attention_heads=NUM_HEADS,
    num_key_value_heads=NUM_KV_HEADS,
    max_position_embeddings=MAX_POSITIONS,
    tie_word_embeddings=False,
    torch_dtype="float32",
)


def _llama_config(vocab_size: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, **_DECODER)


def make_picollama(path: PathLike, vocab_size: int = DEFAULT_VOCAB) -> str:
    """Write a tiny random Llama causal LM to ``path`` and return the path."""
    config = _llama_config(vocab_size)
    config.architectures = ["LlamaForCausalLM"]
    return _save(LlamaForCausalLM, config, path)


def make_gpt2size(path: PathLike) -> str:
    """Write a GPT-2-shaped (12 layer) but tiny-width random model to ``path``."""
    config = GPT2Config(
        vocab_size=DEFAULT_VOCAB,
        n_positions=MAX_POSITIONS,
        n_embd=HIDDEN_SIZE,
        n_layer=12,
        n_head=NUM_HEADS,
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="float32",
    )
    config.architectures = ["GPT2LMHeadModel"]
    return _save(GPT2LMHeadModel, config, path)


def make_picogranite(path: PathLike, vocab_size: int = DEFAULT_VOCAB) -> str:
    """Write a tiny random Granite causal LM to ``path`` and return the path."""
    config = GraniteConfig(vocab_size=vocab_size, **_DECODER)
    config.architectures = ["GraniteForCausalLM"]
    return _save(GraniteForCausalLM, config, path)


def make_picoLlaVa(path: PathLike, vocab_size: int = DEFAULT_VOCAB) -> str:
    """Write a tiny random LLaVA (Llama text + CLIP vision) model to ``path``.

    The checkpoint uses transformers 5's in-memory key names
    (``model.language_model.*``, ``model.vision_tower.*``, ...). The legacy
    layout that ``save_pretrained`` writes (``language_model.model.*``) is not
    fully understood by mergekit 0.1.5's architecture inference: it treats
    every language-model weight as optional and silently leaves them out of
    the merge, so the VLM tests would only exercise the vision tower.
    """
    vision = CLIPVisionConfig(
        hidden_size=HIDDEN_SIZE,
        intermediate_size=INTERMEDIATE_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        image_size=32,
        patch_size=8,
        projection_dim=HIDDEN_SIZE,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=_llama_config(vocab_size),
        image_token_index=vocab_size - 1,
        projector_hidden_act="gelu",
        torch_dtype="float32",
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    return _save(LlavaForConditionalGeneration, config, path, in_memory_keys=True)


def _output_weights_file_exists(out_dir: str) -> bool:
    """True if the merge wrote weights: one shard or a sharded index."""
    names = set(os.listdir(out_dir))
    return bool(
        {
            "model.safetensors",
            "model.safetensors.index.json",
            "pytorch_model.bin",
            "pytorch_model.bin.index.json",
        }
        & names
    )


def _check_no_nan(out_dir: str) -> None:
    loader = LazyTensorLoader.from_disk(out_dir, lazy_unpickle=False)
    names = sorted(loader.index.tensor_paths)
    assert names, f"Merge output in {out_dir} contains no tensors"
    for name in names:
        tensor = loader.get_tensor(name)
        if tensor.is_floating_point():
            assert not torch.isnan(tensor).any(), f"NaN in output tensor {name}"


def _check_expected_tensors(
    out_dir: str,
    auto_arch: bool,
    merge_config: Optional[MergeConfiguration] = None,
    options: Optional[MergeOptions] = None,
) -> None:
    """Every non-optional weight of the architecture must exist in the output.

    Without ``auto_arch`` the architecture is mergekit's JSON definition for
    the output's ``config.json``. With ``auto_arch`` (models that have no JSON
    definition, e.g. LLaVA) it is what mergekit resolves for the merge's
    *input* models, i.e. the layout mergekit itself inferred and promised to
    write; inferring from the output alone could not notice a tensor that is
    missing from every layer.
    """
    model_config = AutoConfig.from_pretrained(out_dir)
    if auto_arch:
        if merge_config is not None:
            arch = get_architecture_info(merge_config, options or MergeOptions())
        else:
            arch = infer_architecture_info(
                (ModelReference.parse(out_dir),), None, options or MergeOptions()
            )
    else:
        arch = arch_info_for_config(model_config)
        assert arch is not None, (
            f"No mergekit architecture definition for {model_config.architectures}"
        )
    loader = LazyTensorLoader.from_disk(out_dir, lazy_unpickle=False)
    present = set(loader.index.tensor_paths)
    missing = [
        w.name
        for w in arch.all_weights(model_config)
        if not w.optional and w.name not in present
    ]
    assert not missing, f"Merge output is missing tensors: {missing}"


def run_and_check_merge(
    config: MergeConfiguration,
    check_nan: bool = True,
    check_tensors: bool = True,
    validate: Optional[Callable[[str], None]] = None,
    index_json_name: Optional[str] = None,
    auto_arch: bool = False,
    options: Optional[MergeOptions] = None,
) -> None:
    """Run ``config`` into a temporary directory and sanity check the result.

    Checks that a ``config.json`` and weights were written (mergekit writes a
    single ``model.safetensors`` for a one-shard output and a
    ``*.index.json`` plus shards otherwise; either is accepted, and
    ``index_json_name`` may name a specific index file that must then exist),
    that no floating tensor contains NaN (``check_nan``), and that every
    non-optional weight of the output architecture is present
    (``check_tensors``; ``auto_arch`` uses the architecture mergekit infers
    from the input models instead of its JSON definitions). Finally calls
    ``validate(out_dir)`` while the output still exists. Exceptions from the
    merge itself propagate unchanged, so ``pytest.raises`` works around it.
    """
    if options is None:
        options = MergeOptions(quiet=True)
    with tempfile.TemporaryDirectory(prefix="mk-merge-") as out_dir:
        run_merge(config, out_path=out_dir, options=options)

        assert os.path.isfile(os.path.join(out_dir, "config.json")), (
            "Merge did not write config.json"
        )
        if index_json_name is not None:
            single = index_json_name.replace(".index.json", "")
            assert os.path.exists(
                os.path.join(out_dir, index_json_name)
            ) or os.path.exists(os.path.join(out_dir, single)), (
                f"Merge wrote neither {index_json_name} nor {single}"
            )
        else:
            assert _output_weights_file_exists(out_dir), (
                f"Merge wrote no weights: {sorted(os.listdir(out_dir))}"
            )

        if check_nan:
            _check_no_nan(out_dir)
        if check_tensors:
            _check_expected_tensors(out_dir, auto_arch, config, options)
        if validate is not None:
            validate(out_dir)
