"""The merged-model view against an independent float64 computation: explicit merged
weights built with plain autograd, run through the transformers model itself."""

import pytest
import torch
from conftest import read_checkpoint
from torch.func import functional_call
from transformers import AutoConfig, AutoModelForCausalLM

from mergekit_dam.core.kernels import ColumnMerge, merge_stack
from mergekit_dam.training.expert_group import RebuiltWeights, stack_experts
from mergekit_dam.training.merged_model import MergedModel
from mergekit_dam.training.skeleton import build_skeleton


def test_column_merge_gradient_matches_autograd():
    generator = torch.Generator().manual_seed(0)
    stack = torch.randn(3, 5, 4, generator=generator, dtype=torch.float64)
    c = torch.rand(3, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda c: ColumnMerge.apply(c, stack), (c,))
    bias_stack = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    torch.autograd.gradcheck(lambda c: ColumnMerge.apply(c, bias_stack), (c,))


def test_merge_stack_keeps_the_stack_dtype_and_accumulates_in_float32():
    stack = torch.randn(3, 8, 8).bfloat16()
    c = torch.rand(3, 8)
    result = merge_stack(c, stack)
    assert result.dtype == torch.bfloat16
    expected = sum(stack[i].float() * c[i] for i in range(3))
    torch.testing.assert_close(result, expected.bfloat16())


@pytest.mark.parametrize("recompute", ["none", "layer", "weights"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: tied embeddings, q/k/v biases
def test_coefficient_gradients_match_naive_float64(arch, recompute, families, monkeypatch):
    _, *experts = families[arch]
    states = [{k: v.double() for k, v in read_checkpoint(m).items()} for m in experts]
    config = AutoConfig.from_pretrained(experts[0])
    generator = torch.Generator().manual_seed(1)
    names = sorted(states[0])
    values = {n: torch.rand(3, states[0][n].shape[-1], generator=generator, dtype=torch.float64) + 0.2 for n in names}
    input_ids = torch.randint(4, 90, (2, 9), generator=generator)
    mask = torch.ones_like(input_ids)
    mask[1, 6:] = 0
    probe = torch.randn(2, 9, config.vocab_size, generator=generator, dtype=torch.float64)

    # ours
    skeleton = build_skeleton(config, torch.device("cpu"))
    view = MergedModel(skeleton, {n: stack_experts([s[n] for s in states], torch.device("cpu"), torch.float64) for n in names}, recompute=recompute)
    raw = view.raw_parameters()
    assert sorted(raw) == names
    rebuilt = []  # recompute: weights must rebuild the layers' merged weights, not keep them
    unpack = RebuiltWeights.unpack
    monkeypatch.setattr(RebuiltWeights, "unpack", staticmethod(lambda packed: rebuilt.append(type(packed)) or unpack(packed)))
    with torch.no_grad():
        for n in names:
            raw[n].data = values[n].clone()  # float64 raw: the comparison is exact to float64 rounding
    logits, tables = view.merged_logits(input_ids, mask)
    assert sorted(tables) == names
    ours = (logits * probe).sum()
    ours_grads = torch.autograd.grad(ours, [raw[n] for n in names])
    layer_weights = [n for n in names if ".layers." in n and not n.endswith(".bias")]  # a bias is added: nothing saved
    assert rebuilt.count(tuple) == (len(layer_weights) if recompute == "weights" else 0), rebuilt
    coefficients = {n: values[n].clone().requires_grad_() for n in names}

    # naive: explicit merged weights, plain autograd, the model loaded by transformers
    reference = AutoModelForCausalLM.from_pretrained(experts[0], dtype=torch.float64).eval()
    merged = {n: sum(coefficients[n][i] * states[i][n] for i in range(3)) for n in names}
    naive = (functional_call(reference, merged, args=(), kwargs=dict(input_ids=input_ids, attention_mask=mask)).logits * probe).sum()
    naive_grads = torch.autograd.grad(naive, [coefficients[n] for n in names])

    torch.testing.assert_close(ours, naive)
    for name, a, b in zip(names, ours_grads, naive_grads):
        torch.testing.assert_close(a, b, msg=name)
    kinds = view.kinds
    assert kinds["lm_head.weight" if arch == "llama" else "model.embed_tokens.weight"] in ("linear", "embedding")
    assert kinds["model.norm.weight"] == "norm" and kinds["model.layers.0.mlp.up_proj.weight"] == "linear"
    if arch == "qwen2":
        assert "lm_head.weight" not in names and kinds["model.layers.0.self_attn.q_proj.bias"] == "linear"


def test_expert_weights_reproduce_the_expert(families):
    _, expert, *_ = families["llama"]
    state = read_checkpoint(expert)
    config = AutoConfig.from_pretrained(expert)
    view = MergedModel(build_skeleton(config, torch.device("cpu")), {n: t[None] for n, t in state.items()})
    input_ids = torch.randint(4, 90, (1, 7))
    mask = torch.ones_like(input_ids)
    reference = AutoModelForCausalLM.from_pretrained(expert).eval()
    torch.testing.assert_close(view.expert_logits(0, input_ids, mask), reference(input_ids=input_ids, attention_mask=mask).logits)


def test_task_vector_parametrization_gradient_and_base_row():
    """W = W_base + sum_i c_i (W_i - W_base): the table's base row is 1 - sum c_i, and the
    coefficient gradient through the merge equals plain autograd on that formula."""
    from mergekit_dam.core.parametrizations import TaskVectors

    generator = torch.Generator().manual_seed(3)
    stack = torch.randn(4, 5, 6, generator=generator, dtype=torch.float64)  # rows: e0, base, e1, e2
    values = torch.rand(3, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    table = TaskVectors(4, base_row=1).table(values)
    torch.testing.assert_close(table[1], 1 - values.sum(0))
    upstream = torch.randn(5, 6, generator=generator, dtype=torch.float64)
    (ColumnMerge.apply(table, stack) * upstream).sum().backward()
    ours = values.grad.clone()

    naive_values = values.detach().clone().requires_grad_()
    experts, base = stack[[0, 2, 3]], stack[1]
    merged = base + (naive_values[:, None, :] * (experts - base)).sum(0)
    (merged * upstream).sum().backward()
    torch.testing.assert_close(ours, naive_values.grad)
    assert TaskVectors(4, 1).start == 1 / 3 and TaskVectors(4, 1, init=0.3).start == 0.3
