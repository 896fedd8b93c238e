"""Packed micro-batches against the examples computed alone, by a plain HF model."""

import pytest
import torch
from conftest import read_checkpoint
from transformers import AutoConfig, AutoModelForCausalLM

from mergekit_dam.core.settings import DamSettings
from mergekit_dam.training import packing
from mergekit_dam.training.data import Batch, Example, ExpertData, collate_examples
from mergekit_dam.training.evaluate import held_out_kl
from mergekit_dam.training.expert_group import stack_experts
from mergekit_dam.training.merged_model import MergedModel
from mergekit_dam.training.modes.end_to_end import micro_batch_loss
from mergekit_dam.training.skeleton import build_skeleton
from mergekit_dam.training.teachers import Cached, Online

CPU = torch.device("cpu")


def test_layout_is_first_fit_longest_first():
    # by hand, width 6: 5 -> row 0; 4 -> row 1; 3 fits neither -> row 2; 2 -> row 1 after the 4
    assert packing.layout([3, 5, 2, 4], 6) == [(2, 0), (0, 0), (1, 4), (1, 0)]


def test_pack_places_each_example_with_its_own_positions_and_scored_tokens():
    examples = [Example([5, 6, 7], [0, 1, 1]), Example([8, 9]), Example([1, 2, 3, 4], [0, 0, 1, 0])]
    batch = packing.pack(examples, [10, 11, 12], width=5, pad_id=0)
    # lengths 3, 2, 4 in rows of 5: the 4 alone, then the 3 and the 2 together
    assert batch.places == [(1, 0), (1, 3), (0, 0)] and batch.sequences == [10, 11, 12]
    assert batch.ids.tolist() == [[1, 2, 3, 4, 0], [5, 6, 7, 8, 9]]
    assert batch.mask.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    # scored: the positions predicting an answer token and the answer's last; plain text all
    assert batch.loss_mask.tolist() == [[0, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    # positions restart at each example; the padding at a row's end counts from 0
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]
    assert batch.inputs(CPU)["attention_mask"] is None


def test_rows_of_a_packed_batch_keep_their_examples():
    first, second = [Example([1] * 3), Example([2] * 5)], [Example([3] * 2), Example([4] * 3)]
    batch, bounds = packing.pack_experts([(first, [7, 8]), (second, [0, 1])], pad_id=0)
    # rows as wide as the longest (5): expert 0's 5 and 3 need a row each; expert 1's 3 and 2 share one
    assert bounds == [(0, 2), (2, 3)]
    assert batch.places == [(1, 0), (0, 0), (2, 3), (2, 0)]
    assert batch.ids[2].tolist() == [4, 4, 4, 3, 3]
    mine = batch.rows(*bounds[1], CPU)
    assert mine.sequences == [0, 1] and mine.places == [(0, 3), (0, 0)]
    assert mine.position_ids.tolist() == [[0, 1, 2, 0, 1]]


@pytest.fixture(scope="module")
def llama(families):
    _, *experts = families["llama"]
    states = [read_checkpoint(m) for m in experts[:2]]
    view = MergedModel(build_skeleton(AutoConfig.from_pretrained(experts[0]), CPU),
                       {n: stack_experts([s[n] for s in states], CPU, torch.float32) for n in states[0]})
    return experts[:2], view


def random_examples(count, seed, lengths=None):
    generator = torch.Generator().manual_seed(seed)
    lengths = lengths or torch.randint(2, 9, (count,), generator=generator).tolist()
    return [Example(torch.randint(4, 90, (n,), generator=generator).tolist(),
                    [0] * (n // 2) + [1] * (n - n // 2) if k % 2 else None) for k, n in enumerate(lengths)]


def test_packed_logits_are_each_example_s_own(llama):
    experts, view = llama
    examples = random_examples(7, 0)
    batch = packing.pack(examples, list(range(7)), width=12, pad_id=0)
    assert batch.ids.shape[0] < 7  # several examples share rows
    packed = view.expert_logits(0, **batch.inputs(CPU))
    own = AutoModelForCausalLM.from_pretrained(experts[0]).eval()
    for example, (row, start) in zip(examples, batch.places):
        alone = own(input_ids=torch.tensor([example.ids])).logits[0]
        torch.testing.assert_close(packed[row, start : start + len(example)], alone, atol=1e-5, rtol=1e-4)
    assert packing.check(lambda b: view.expert_logits(0, **b.inputs(CPU)), examples, 0)[0]


def test_the_check_refuses_a_model_that_lets_packed_examples_see_each_other():
    table = torch.randn(100, 8, generator=torch.Generator().manual_seed(0))

    def mixing(batch):  # each position sees everything before it in its row, whatever the positions say
        return table[batch.ids].cumsum(1)

    def per_token(batch):
        return table[batch.ids] + 0.1 * (batch.position_ids if batch.position_ids is not None else torch.arange(batch.ids.shape[1]))[..., None]

    examples = random_examples(5, 1)
    works, difference = packing.check(mixing, examples, 0)
    assert not works and difference > 0.1
    assert packing.check(per_token, examples, 0) == (True, 0.0)


def test_worth_packing_only_where_padding_is_a_large_share():
    assert packing.worth_packing({0: [Example([1] * 8)] * 3, 1: [Example([1] * 40)]})
    assert not packing.worth_packing({0: [Example([1] * 38), Example([1] * 40)]})


@pytest.mark.parametrize("cached", [False, True])
def test_a_packed_micro_batch_has_the_padded_one_s_loss_and_gradient(llama, cached):
    _, view = llama
    settings = DamSettings(batch_size=3, similarity_weight=0.01, temperature=2.0)
    data = {0: random_examples(3, 2, [8, 3, 4]), 1: random_examples(3, 3, [2, 5, 3])}
    groups = [(data[i], [0, 1, 2]) for i in (0, 1)]
    packed, bounds = packing.pack_experts(groups, pad_id=0)
    padded = Batch([0, 1, 2] * 2, *collate_examples(data[0] + data[1], 0))
    assert packed.ids.numel() < padded.ids.numel()

    def expert_logits(i, b):
        return view.expert_logits(i, **b.inputs(CPU))

    if cached:
        teacher = Cached(expert_logits, settings, CPU)
        for i in (0, 1):
            teacher.prepare(i, [Batch.of(data[i], [0, 1, 2], 0)])
    else:
        teacher = Online(expert_logits, settings, CPU)
    results = []
    for batch, where in ((padded, None), (packed, bounds)):
        params = list(view.raw_parameters().values())
        for p in params:
            p.grad = None
        loss, kls = micro_batch_loss(view, [0, 1], batch, teacher, settings, CPU, None, where)
        loss.backward()
        results.append((loss.detach(), kls, [p.grad.clone() for p in params]))
    (loss_a, kls_a, grads_a), (loss_b, kls_b, grads_b) = results
    assert loss_a > 0
    torch.testing.assert_close(loss_b, loss_a, atol=1e-5, rtol=1e-4)
    for i in (0, 1):
        torch.testing.assert_close(kls_b[i], kls_a[i], atol=1e-5, rtol=1e-4)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-3)


def test_packed_validation_chunks_give_the_padded_held_out_kl(llama):
    _, view = llama
    data = ExpertData([0, 1], {}, {0: random_examples(9, 4), 1: random_examples(9, 5)}, pad_id=0)

    def kl(chunks):
        return held_out_kl(["a", "b"], chunks, lambda b: view.merged_logits(**b.inputs(CPU))[0],
                           lambda i, b: view.expert_logits(i, **b.inputs(CPU)), 2.0, CPU)

    packed = data.chunks("held_out", 4, lambda examples, sequences: packing.pack(examples, sequences, 0, 0))
    padded = data.chunks("held_out", 4)
    assert sum(b.ids.numel() for b in packed[0]) < sum(b.ids.numel() for b in padded[0])
    expected, got = kl(padded), kl(packed)
    assert expected["a"] > 0 and set(got) == {"a", "b"}
    for row in got:
        assert abs(got[row] - expected[row]) <= 1e-5 * expected[row]


def test_auto_packs_on_a_cpu_where_padding_is_a_large_share_and_pads_on_accelerators(caplog):
    import logging

    from mergekit_dam.training.modes.end_to_end import _packs

    data = ExpertData([0, 1], {0: random_examples(6, 6, [3, 4, 2, 3, 5, 2]), 1: random_examples(3, 7, [20, 19, 18])}, {}, pad_id=0)
    calls = []

    def per_token(index, batch):  # keeps packed examples apart
        calls.append(index)
        return torch.nn.functional.one_hot(batch.ids, 100).float() + 0.1 * batch.inputs(CPU).get("position_ids", torch.arange(batch.ids.shape[1]))[..., None]

    with caplog.at_level(logging.INFO, logger="mergekit_dam"):
        assert _packs(DamSettings(), data, per_token, CPU) and calls == [0, 0]  # the check: padded, then packed
        assert not _packs(DamSettings(), data, per_token, torch.device("cuda")) and calls == [0, 0]  # no check run
        assert _packs(DamSettings(packing="on"), data, per_token, torch.device("cuda")) and calls == [0] * 4
        assert not _packs(DamSettings(packing="off"), data, per_token, CPU)
    assert "packing: auto pads on cuda" in caplog.text
    even = ExpertData([0], {0: random_examples(3, 8, [10, 10, 9])}, {}, pad_id=0)
    assert not _packs(DamSettings(), even, per_token, CPU) and _packs(DamSettings(packing="on"), even, per_token, CPU)
