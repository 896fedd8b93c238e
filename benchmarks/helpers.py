"""What several benchmark scripts share, in one place (each script imports it as its
neighbour: `python benchmarks/<script>.py` puts this folder first on the path). Everything
else a benchmark uses is the package's own code, through its public names."""

from __future__ import annotations

import json

import yaml

from mergekit_dam import sidecar

# Mistral-style geometries the GPU benchmarks build random experts of
GEOMETRIES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=512),
    "1b": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8, vocab_size=32000),
    "7b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, vocab_size=32000),
}


def read_report(artifact: str) -> dict:
    """The training report written beside `artifact`."""
    with open(sidecar(artifact, "report"), encoding="utf-8") as handle:
        return json.load(handle)


def variant(text: str) -> tuple:
    """A DAM run given as NAME:key=value[,key=value...] (values read as YAML): (NAME, settings);
    a first item `defaults` (NAME:defaults,key=value...) marks settings over the package's
    defaults rather than the demo's, as {"defaults": True, ...}."""
    name, _, settings = text.partition(":")
    items = [item for item in settings.split(",") if item]
    over_defaults = bool(items) and items[0] == "defaults"
    values = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in items[over_defaults:])}
    return name, ({"defaults": True} if over_defaults else {}) | values
