"""compare's metrics against hand computations on a tiny model."""

import json
import math
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergekit_dam.tools.compare import (
    Scorer,
    Suite,
    kl_to,
    markdown,
    score,
    write_outputs,
)


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_metrics_match_hand_computation(families, tmp_path):
    base, expert, other, _ = families["llama"]
    scorer = Scorer(expert)
    model = AutoModelForCausalLM.from_pretrained(expert).eval()
    tokenizer = AutoTokenizer.from_pretrained(expert)
    prompt, answer = "ab", "cd"
    ids = tokenizer(prompt)["input_ids"] + tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)
    start = len(tokenizer(prompt)["input_ids"])
    expected = -sum(log_probs[i - 1, ids[i]].item() for i in range(start, len(ids))) / (len(ids) - start)
    assert abs(scorer.nll([{"prompt": prompt, "answer": answer}]) - expected) < 1e-5

    # teacher-forced: the same NLL, and a record counts when every answer token (and EOS) is the argmax
    records = [{"prompt": "ab", "answer": "cd"}, {"prompt": "x", "answer": scorer.greedy(["x"], 3)[0]}, {"prompt": "hello", "answer": "q"}]
    hits = []
    for record in records:
        head = tokenizer(record["prompt"])["input_ids"]
        full = head + tokenizer(record["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        with torch.no_grad():
            argmax = model(input_ids=torch.tensor([full])).logits[0].argmax(-1)
        hits.append(all(argmax[i - 1].item() == full[i] for i in range(len(head), len(full))))
    forced = scorer.teacher_forced(records, chunk=2)
    assert forced["accuracy"] == sum(hits) / len(records)
    assert abs(scorer.teacher_forced(records[:1])["nll"] - expected) < 1e-5

    # greedy decoding (batched, left-padded) equals transformers' own generate, per prompt
    prompts = ["xy", "hello there"]
    ours = scorer.greedy(prompts, 4)
    for prompt, text in zip(prompts, ours):
        reference = model.generate(torch.tensor([tokenizer(prompt)["input_ids"]]), max_new_tokens=4, do_sample=False,
                                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        assert text == tokenizer.decode(reference[0, len(tokenizer(prompt)["input_ids"]):], skip_special_tokens=True)
    # exact match: whole answer, whitespace-trimmed
    scorer.greedy = lambda prompts, limit: ["cd ", "zz"]
    assert scorer.accuracy([{"prompt": "a", "answer": "cd"}, {"prompt": "b", "answer": "zy"}]) == 0.5

    # KL to itself is 0; to another model it equals the direct computation
    assert abs(kl_to(scorer, scorer, ["hello"])) < 1e-7
    other_model = AutoModelForCausalLM.from_pretrained(other).eval()
    text_ids = torch.tensor([tokenizer("hello")["input_ids"]])
    with torch.no_grad():
        p = torch.log_softmax(model(input_ids=text_ids).logits, -1)
        q = torch.log_softmax(other_model(input_ids=text_ids).logits, -1)
    direct = (p.exp() * (p - q)).sum(-1).mean().item()
    assert abs(kl_to(scorer, Scorer(other), ["hello"]) - direct) < 1e-5


def test_score_table_chart_and_retention(families, tmp_path):
    base, expert, other, _ = families["llama"]
    skill = _write(tmp_path / "skill.jsonl", [{"prompt": "ab", "answer": "cd"}, {"prompt": "x", "answer": "y"}])
    general = _write(tmp_path / "general.jsonl", [{"text": "plain text."}])
    suite = Suite(skills={"s": skill}, experts={"s": expert}, general=general, base=base)
    results = score({"base": base, "expert": expert, "other": other}, suite)
    assert results["expert"]["s"]["kl"] < 1e-7 and results["other"]["s"]["kl"] > 0
    assert math.isclose(results["expert"]["s"]["ppl"], math.exp(results["expert"]["s"]["nll"]))
    assert results["expert"]["retention"]["s"]["nll"] == 1.0 and results["base"]["retention"]["s"]["nll"] == 0.0
    table = markdown(results)
    assert table.splitlines()[0].startswith("| model | s acc | s NLL | s KL")
    outputs = write_outputs(results, str(tmp_path / "out"))
    assert os.path.getsize(outputs["chart"]) > 10_000
    with open(outputs["chart"], "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


def test_cli_compare_on_user_models_and_files(families, tmp_path, capsys):
    from mergekit_dam.cli import main as cli

    base, expert, *_ = families["llama"]
    skill = _write(tmp_path / "skill.jsonl", [{"prompt": "ab", "answer": "cd"}])
    code = cli(["compare", f"base={base}", expert, "--skill", f"s={skill}", "--expert", f"s={expert}",
                "--base", base, "--out", str(tmp_path / "out")])
    assert code == 0
    out = capsys.readouterr().out
    assert "| base |" in out and "| expert_1 |" in out and "chart:" in out
    assert cli(["compare", base, "--out", str(tmp_path / "x")]) == 1  # no held-out data: one-line error


def test_cli_compare_quiet_shows_no_progress_bars(families, tmp_path, capsys):
    from transformers.utils import logging as transformers_logging

    from mergekit_dam.cli import main as cli

    base, expert, *_ = families["llama"]
    skill = _write(tmp_path / "skill.jsonl", [{"prompt": "ab", "answer": "cd"}])
    argv = ["compare", f"base={base}", expert, "--skill", f"s={skill}", "--out", str(tmp_path / "out")]
    transformers_logging.enable_progress_bar()  # transformers' default, which an earlier `-q` in this process may have switched
    try:
        assert cli(argv) == 0
        assert "Loading weights" in capsys.readouterr().err  # the bar this test is about, shown by default
        assert cli(["-q", *argv]) == 0
        captured = capsys.readouterr()
        assert "| base |" in captured.out
        assert "Loading weights" not in captured.err and "it/s" not in captured.err, captured.err
    finally:
        transformers_logging.enable_progress_bar()
