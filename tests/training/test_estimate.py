"""The pre-training estimate (training/estimate.py) against its terms computed by hand for a
two-layer geometry."""

from types import SimpleNamespace

import torch

from mergekit_dam.core.tensor_spec import TensorSpec
from mergekit_dam.training.estimate import estimate

HIDDEN, INTERMEDIATE, VOCAB, LAYERS = 8, 16, 32, 2
TENSORS = [TensorSpec("model.embed_tokens.weight", (VOCAB, HIDDEN)), TensorSpec("lm_head.weight", (VOCAB, HIDDEN)),
           TensorSpec("model.norm.weight", (HIDDEN,))]
TENSORS += [TensorSpec(f"model.layers.{b}.mlp.up_proj.weight", (INTERMEDIATE, HIDDEN)) for b in range(LAYERS)]
JOB = SimpleNamespace(tensors=TENSORS, rows=["a", "b", "c"],
                      out_config=SimpleNamespace(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, intermediate_size=INTERMEDIATE))
OUTER, LAYER = 2 * VOCAB * HIDDEN + HIDDEN, INTERMEDIATE * HIDDEN
PARAMS = OUTER + LAYERS * LAYER


def test_memory_terms_per_recompute_mode():
    sequences, length, trainable = 6, 10, 1000
    tokens, element = sequences * length, 2  # bfloat16
    per_layer = tokens * element * (10 * HIDDEN + 4 * INTERMEDIATE)
    plans = {mode: estimate(JOB, torch.bfloat16, sequences, length, trainable, 1, mode) for mode in ("layer", "weights", "none")}
    for plan in plans.values():
        memory = plan["memory_bytes"]
        assert memory["expert_weights"] == 3 * PARAMS * element
        assert memory["coefficients_and_adam"] == trainable * 16 and memory["logits"] == tokens * VOCAB * 16
        assert plan["peak_bytes"] == sum(memory.values())
        assert plan["flops_per_step"] == 8 * PARAMS * tokens
    assert plans["layer"]["memory_bytes"]["merged_weights"] == (OUTER + LAYER) * element
    assert plans["layer"]["memory_bytes"]["activations"] == tokens * HIDDEN * LAYERS * element + per_layer
    assert plans["weights"]["memory_bytes"]["merged_weights"] == (OUTER + LAYER) * element
    assert plans["weights"]["memory_bytes"]["activations"] == LAYERS * per_layer
    assert plans["none"]["memory_bytes"]["merged_weights"] == PARAMS * element


def test_sharding_divides_the_experts_and_adds_one_gathered_group():
    one, four = (estimate(JOB, torch.float32, 2, 8, 400, world, "layer")["memory_bytes"] for world in (1, 4))
    assert four["expert_weights"] == 3 * PARAMS * 4 // 4 + 3 * 3 * max(LAYER, VOCAB * HIDDEN) * 4
    assert four["coefficients_and_adam"] == one["coefficients_and_adam"] // 4
