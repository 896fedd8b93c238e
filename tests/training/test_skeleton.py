"""The stock model training runs through (training/skeleton.py): no weights of its own,
its tensor kinds, and its decoder layers."""

import torch
from transformers import AutoConfig

from mergekit_dam.training.skeleton import build_skeleton, decoder_layers, tensor_kinds


def test_the_skeleton_is_meta_with_real_buffers_and_its_kinds(families):
    config = AutoConfig.from_pretrained(families["qwen2"][0])
    skeleton = build_skeleton(config, torch.device("cpu"))
    assert all(p.device.type == "meta" for p in skeleton.parameters())
    assert all(b.device.type == "cpu" for b in skeleton.buffers())
    assert not skeleton.training and not any(p.requires_grad for p in skeleton.parameters())
    kinds = tensor_kinds(skeleton)
    assert kinds["model.embed_tokens.weight"] == "embedding" and kinds["model.norm.weight"] == "norm"
    assert kinds["model.layers.0.self_attn.q_proj.bias"] == "linear" and kinds["model.layers.1.mlp.up_proj.weight"] == "linear"
    prefix, layers = decoder_layers(skeleton)
    assert prefix == "model.layers" and len(layers) == config.num_hidden_layers
