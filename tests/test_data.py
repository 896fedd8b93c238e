import json

import pytest
import torch

from mergekit_dam.plugin.config import DamError, ModelSettings
from mergekit_dam.tools.tiny import make_tokenizer
from mergekit_dam.training.data import collate, tokenize

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
    return sorted(tokenizer.decode(s, skip_special_tokens=True) for s in sequences)


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
        ('{"title": "x"}\n', "no `text` text, `messages` or prompt/response fields \\(found: title\\)"),
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
