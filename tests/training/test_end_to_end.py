"""The end-to-end mode's micro-batch loss, recomputed independently from the logits."""

import pytest
import torch
from conftest import read_checkpoint
from transformers import AutoConfig, AutoModelForCausalLM

from mergekit_dam.core.settings import DamSettings
from mergekit_dam.training.data import Batch
from mergekit_dam.training.expert_group import stack_experts
from mergekit_dam.training.merged_model import MergedModel
from mergekit_dam.training.modes.end_to_end import micro_batch_loss
from mergekit_dam.training.objective import kl_divergence
from mergekit_dam.training.skeleton import build_skeleton
from mergekit_dam.training.teachers import Online


def test_the_kl_counts_only_the_answer_tokens(families):
    _, *experts = families["llama"]
    states = [read_checkpoint(m) for m in experts[:2]]
    cpu = torch.device("cpu")
    view = MergedModel(build_skeleton(AutoConfig.from_pretrained(experts[0]), cpu),
                       {n: stack_experts([s[n] for s in states], cpu, torch.float32) for n in states[0]})
    ids = torch.randint(4, 90, (4, 7), generator=torch.Generator().manual_seed(0))  # rows: expert 0, 0, 1, 1
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    loss_mask = torch.zeros_like(ids)
    loss_mask[:, 3:] = 1  # "answers": positions 3.. of each row
    loss_mask *= mask
    settings = DamSettings(batch_size=2, similarity_weight=0.0, temperature=2.0)
    teacher = Online(lambda i, b: view.expert_logits(i, b.ids, b.mask), settings, cpu)
    loss, kls = micro_batch_loss(view, [0, 1], Batch([0, 1, 0, 1], ids, mask, loss_mask), teacher, settings, cpu)

    # independently: the merged model is the 1/2 average; each expert's rows against its own model
    average = {n: (states[0][n] + states[1][n]) / 2 for n in states[0]}
    merged = AutoModelForCausalLM.from_pretrained(experts[0]).eval()
    merged.load_state_dict(average, strict=False)
    student = merged(input_ids=ids, attention_mask=mask).logits
    expected = 0
    for slot, expert in enumerate(experts[:2]):
        rows = slice(2 * slot, 2 * slot + 2)
        own = AutoModelForCausalLM.from_pretrained(expert).eval()(input_ids=ids[rows], attention_mask=mask[rows]).logits
        kl = kl_divergence(student[rows], own, loss_mask[rows], 2.0)
        torch.testing.assert_close(kls[slot], kl, atol=1e-5, rtol=1e-4)
        expected = expected + kl
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-4)
    # the retain data's row counts retain_weight times, outside the balance of the experts
    weighted, _ = micro_batch_loss(view, [0, 1], Batch([0, 1, 0, 1], ids, mask, loss_mask), teacher,
                                   settings.model_copy(update={"retain_weight": 3.0, "balance": 1.0}), cpu, retain=1)
    torch.testing.assert_close(weighted, kls[0] + 3.0 * kls[1], atol=1e-5, rtol=1e-4)
    # balanced, each expert's KL weighs by its share of the KLs (mean weight 1)
    balanced, _ = micro_batch_loss(view, [0, 1], Batch([0, 1, 0, 1], ids, mask, loss_mask), teacher,
                                   settings.model_copy(update={"balance": 1.0}), cpu)
    share = torch.stack([kls[0], kls[1]]) / (kls[0] + kls[1]) * 2
    torch.testing.assert_close(balanced, share[0] * kls[0] + share[1] * kls[1], atol=1e-5, rtol=1e-4)
    # and the prompt tokens do matter to an all-token KL: the mask is what made the difference
    everything = micro_batch_loss(view, [0, 1], Batch([0, 1, 0, 1], ids, mask), teacher, settings, cpu)[0]
    assert not torch.allclose(everything, loss)


