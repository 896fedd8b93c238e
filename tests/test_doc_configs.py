"""Every YAML config a user can copy is valid: each ```yaml block of README.md and docs/*.md and
every file of example_configs/, checked offline with mergekit's config schema (and that its merge
method exists) and, for `merge_method: dam`, the plugin's own settings checks. A YAML block that is
not a merge config says so in an HTML comment on the line above it (NOT_A_CONFIG). An example that
names hub models or datasets says, next to it, that it needs the hub."""

import glob
import os
import re

import pytest
import yaml
from mergekit.config import MergeConfiguration

import mergekit_dam  # noqa: F401  registers merge_method "dam"
from mergekit_dam.core import auto
from mergekit_dam.plugin.config import check_merge_config

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)
NOT_A_CONFIG = "<!-- not a merge config -->"
DATA_EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv", ".txt")


def markdown_blocks(path: str):
    """(name, text, the prose just above it, marked as not a config) of each ```yaml block."""
    lines = open(path, encoding="utf-8").read().split("\n")
    blocks, index = [], 0
    while index < len(lines):
        if lines[index].strip() in ("```yaml", "```yml"):
            start = index
            index += 1
            while lines[index].strip() != "```":
                index += 1
            above = [line for line in lines[:start] if line.strip()]
            marked = bool(above) and above[-1].strip() == NOT_A_CONFIG
            blocks.append((f"{os.path.relpath(path, ROOT)}:{start + 1}", "\n".join(lines[start + 1 : index]),
                           "\n".join(above[-6:]), marked))
        index += 1
    return blocks


def documents():
    """Every YAML a user can copy: (name, text, the words next to it, marked as not a config)."""
    found = []
    for path in [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]:
        found += markdown_blocks(path)
    for path in sorted(glob.glob(os.path.join(ROOT, "example_configs", "**", "*.yml"), recursive=True)):
        text = open(path, encoding="utf-8").read()
        found.append((os.path.relpath(path, ROOT), text, "\n".join(l for l in text.split("\n") if l.startswith("#")), False))
    return found


DOCUMENTS = documents()


def normalised(config: dict) -> MergeConfiguration:
    """The shape mergekit's planner leaves (modules -> slices -> sources), without reading any
    model: `models:` become one slice of two layers."""
    config = dict(config)
    if config.get("models"):
        sources = [{**model, "layer_range": [0, 2]} for model in config.pop("models")]
        config["modules"] = {"default": {"slices": [{"sources": sources}]}}
    elif config.get("slices"):
        config["modules"] = {"default": {"slices": config.pop("slices")}}
    return MergeConfiguration.model_validate(config)


def references(config: dict):
    """The model and dataset names a config uses."""
    names = [config.get("base_model")]
    for model in config.get("models") or []:
        names += [model.get("model"), (model.get("parameters") or {}).get("dataset")]
    for piece in config.get("slices") or []:
        names += [source.get("model") for source in piece.get("sources", [])]
    names.append((config.get("parameters") or {}).get("retain_dataset"))
    return [str(name) for name in names if name]


def is_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.endswith(DATA_EXTENSIONS)


def check(config: dict) -> None:
    """What `mergekit-yaml` checks of a config before it reads a model."""
    from mergekit.merge_methods import get

    MergeConfiguration.model_validate(config)
    get(config["merge_method"])  # a method mergekit (or this plugin) provides
    if config["merge_method"] == "dam":
        dam = check_merge_config(normalised(config))
        trains = any(model.dataset for model in dam.models.values())
        auto.parametrization(dam.settings, config.get("base_model"), trains)  # settings that need a base_model


def test_every_config_is_found():
    """Not empty by mistake: the README's quick start, the docs' examples and every example file."""
    names = [name for name, *_ in DOCUMENTS]
    assert any(name.startswith("README.md:") for name in names)
    assert any(name.startswith("docs/") for name in names)
    assert len([n for n in names if n.startswith("example_configs/")]) == len(
        glob.glob(os.path.join(ROOT, "example_configs", "**", "*.yml"), recursive=True))


@pytest.mark.parametrize("name, text, near, marked", DOCUMENTS, ids=[d[0] for d in DOCUMENTS])
def test_config_is_valid(name, text, near, marked, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths resolve to nothing: no artifact is opened
    if marked:
        pytest.skip("marked as not a merge config")
    stages = [stage for stage in yaml.safe_load_all(text) if stage is not None]
    assert stages, f"{name}: an empty YAML block"
    names = {stage.get("name") for stage in stages}
    for stage in stages:
        assert isinstance(stage, dict) and "merge_method" in stage, (
            f"{name}: not a merge config; mark it with {NOT_A_CONFIG} on the line above")
        assert stage["merge_method"] not in names, f"{name}: a stage named like a method refers to itself"
        check({key: value for key, value in stage.items() if key != "name"})
    hub = [ref for stage in stages for ref in references(stage) if not is_local(ref) and ref not in names]
    if hub:
        assert re.search(r"\bhub\b", near, flags=re.IGNORECASE), (
            f"{name} uses {hub} from the hub: say next to it that it needs the hub")


def test_a_wrong_config_fails():
    """The check is not a formality: a misspelt setting, a method that does not exist and
    task vectors without a base are caught."""
    from mergekit_dam.core.errors import DamError

    good = {"merge_method": "dam", "base_model": "./base", "models": [{"model": "./a", "parameters": {"dataset": "a.jsonl"}}]}
    check(good)
    with pytest.raises(DamError, match="temperature"):
        check({**good, "parameters": {"tempreature": 2}})
    with pytest.raises(DamError, match="base_model"):
        without_base = {key: value for key, value in good.items() if key != "base_model"}
        check({**without_base, "parameters": {"parametrization": "task_vectors"}})
    with pytest.raises(RuntimeError, match="Unimplemented merge method dma"):
        check({**good, "merge_method": "dma"})


def test_a_yaml_block_can_be_marked(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(f"Text.\n\n{NOT_A_CONFIG}\n```yaml\nskills: [a]\n```\n\n"
                    "A config (it needs the hub):\n\n```yaml\nmerge_method: linear\n```\n")
    (first, _, _, marked), (second, _, near, unmarked) = markdown_blocks(str(page))
    assert marked and not unmarked and "needs the hub" in near


def test_docs_show_the_example_files_they_name():
    """docs/usage.md shows example_configs/multi/ties_then_dam.yml as it is, and
    docs/configuration.md's config is example_configs/dam.yml without the defaults written out."""
    def block(page):
        return next(text for name, text, _, _ in DOCUMENTS if name.startswith(page))

    with open(os.path.join(ROOT, "example_configs", "multi", "ties_then_dam.yml"), encoding="utf-8") as handle:
        assert list(yaml.safe_load_all(block("docs/usage.md"))) == list(yaml.safe_load_all(handle))
    with open(os.path.join(ROOT, "example_configs", "dam.yml"), encoding="utf-8") as handle:
        example = yaml.safe_load(handle)
    shown = yaml.safe_load(block("docs/configuration.md"))
    assert {k: v for k, v in shown.items() if k != "parameters"} == {k: v for k, v in example.items() if k != "parameters"}
    assert shown["parameters"].items() <= example["parameters"].items()
