"""The merged-model view: the stock Hugging Face model, built once, computing with
merged weights W = sum_i f(c_i)[None, :] * W_i (or with one expert's own weights).

No per-architecture code and no modelling files: the skeleton is instantiated from the
output config with parameters on the meta device (buffers such as rotary frequencies
stay real), and weights are substituted with torch.func.functional_call. The tensors
are split into groups, the units that are merged together (and that FSDP shards):
the input embedding, each decoder layer, and the head (final norm, lm_head). Each
decoder layer of the skeleton is wrapped in a `MergedBlock` that builds its group's
merged weights only when the layer runs, so one layer's merged copy exists at a time;
with `recompute` the block is also activation-checkpointed, so backward rebuilds the
layer's weights instead of keeping them.

Merged weights come from `kernels.ColumnMerge`, which keeps nothing for backward but the
coefficients and the (persistent) expert stack.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Optional, Sequence, Set

import torch
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from mergekit_dam.kernels import ColumnMerge, merge_stack
from mergekit_dam.plugin.config import DamError

NONLINEARITIES = {  # f and its inverse (for the initial value f(raw) = 1/N)
    "none": (lambda x: x.clone(), lambda y: y),  # clone: FSDP frees the gathered parameter after forward
    "tanh": (torch.tanh, torch.atanh),
    "sigmoid": (torch.sigmoid, torch.logit),
    "relu": (torch.relu, lambda y: y),
}


def tensor_kinds(skeleton: torch.nn.Module) -> Dict[str, str]:
    """'linear' (nn.Linear weights and biases, lm_head included), 'embedding', or 'norm'
    (every other parameter: RMSNorm/LayerNorm weights and the like)."""
    kinds = {}
    for module_name, module in skeleton.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}" if module_name else param_name
            if isinstance(module, torch.nn.Linear):
                kinds[name] = "linear"
            elif isinstance(module, torch.nn.Embedding):
                kinds[name] = "embedding"
            else:
                kinds[name] = "norm"
    return kinds


def build_skeleton(config, device: torch.device, trust_remote_code: bool = False) -> torch.nn.Module:
    """The stock model class with meta parameters and real buffers on `device`, tied like the config."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    skeleton.tie_weights()  # from_config under empty init skips tying (transformers 5)
    for module in skeleton.modules():
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[name] = buffer.to(device)
    skeleton.eval()  # no dropout: logits must be a deterministic function of the weights
    skeleton.requires_grad_(False)
    return skeleton


def decoder_layers(skeleton: torch.nn.Module) -> tuple:
    """(prefix, ModuleList) of the decoder layers: the ModuleList with num_hidden_layers entries."""
    count = getattr(skeleton.config, "num_hidden_layers", None)
    for name, module in skeleton.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return name, module
    raise DamError(f"dam: cannot find the {count} decoder layers of {type(skeleton).__name__}; DAM needs a decoder-only model")


class Coefficients(torch.nn.Module):
    """One group's coefficient tables: raw float32 [N, D] parameters for the tensors that
    train (effective value f(raw), initially 1/N), fixed 1/N tables for the rest."""

    def __init__(self, widths: Sequence[int], trained: Sequence[bool], n: int, nonlinearity: str, device):
        super().__init__()
        self.function, inverse = NONLINEARITIES[nonlinearity]
        start = float(inverse(torch.tensor(1.0 / n)))
        self.trained = list(trained)
        self.raw = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.full((n, width), start, device=device)) for width, t in zip(widths, trained) if t]
        )
        for slot, (width, t) in enumerate(zip(widths, trained)):
            if not t:
                self.register_buffer(f"fixed{slot}", torch.full((n, width), 1.0 / n, device=device))

    def forward(self) -> List[torch.Tensor]:
        raw = iter(self.raw)
        return [self.function(next(raw)) if t else getattr(self, f"fixed{slot}") for slot, t in enumerate(self.trained)]


class TensorGroup(torch.nn.Module):
    """The expert stacks [N, *shape] (frozen parameters) of one group's tensors and their
    coefficients: the unit merged together, gathered together, and sharded by FSDP."""

    def __init__(self, names: Sequence[str], full_names: Sequence[str], stacks: Sequence[torch.Tensor], coefficients: Coefficients):
        super().__init__()
        self.names = list(names)  # as the module that runs them sees them
        self.full_names = list(full_names)  # in the checkpoint and the artifact
        self.stacks = torch.nn.ParameterList([torch.nn.Parameter(s, requires_grad=False) for s in stacks])
        self.coefficients = coefficients
        self.copy_experts = False  # FSDP: an expert's slice must outlive the gathered stack

    def forward(self, selection) -> tuple:
        """(weights by name, effective tables of the trained tensors by full name): merged
        weights for selection None, expert `selection`'s own weights for an index; for
        "tables", no weights and the effective tables of every tensor."""
        if selection == "tables":
            return {}, dict(zip(self.full_names, self.coefficients()))
        if selection is not None:
            return {n: s[selection].clone() if self.copy_experts else s[selection] for n, s in zip(self.names, self.stacks)}, {}
        weights, tables = {}, {}
        for name, full_name, stack, table in zip(self.names, self.full_names, self.stacks, self.coefficients()):
            if table.requires_grad:
                weights[name], tables[full_name] = ColumnMerge.apply(table, stack), table
            else:
                weights[name] = merge_stack(table, stack)
        return weights, tables


class MergedBlock(torch.nn.Module):
    """Decoder layer `index` of the skeleton, computing with its group's weights."""

    def __init__(self, layer: torch.nn.Module, index: int, view: "MergedModel"):
        super().__init__()
        self.layer = layer
        self.index = index
        object.__setattr__(self, "view", view)  # a back-reference, not a submodule

    def __getattr__(self, name):  # attributes the model's forward reads (e.g. attention_type)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["layer"], name)

    def forward(self, hidden_states, *args, **kwargs):
        if self.view.intercept is not None:
            return self.view.intercept(self, hidden_states, args, kwargs)
        output, tables = self.run(self.view.selection, hidden_states, *args, **kwargs)
        self.view.collected.update(tables)
        return output

    def run(self, selection: Optional[int], hidden_states, *args, **kwargs) -> tuple:
        """(layer output, trained tables) with merged (None) or expert `selection` weights."""
        group = self.view.groups[f"layer{self.index}"]

        def compute(hidden_states, *args, **kwargs):
            weights, tables = group(selection)
            return functional_call(self.layer, weights, (hidden_states, *args), kwargs), tables

        if self.view.recompute and selection is None and torch.is_grad_enabled():
            return checkpoint(compute, hidden_states, *args, use_reentrant=False, **kwargs)
        return compute(hidden_states, *args, **kwargs)


class MergedModel(torch.nn.Module):
    """Forward passes of the merged model and of each expert through one skeleton.

    A Module whose submodules are the groups, so that sharded, it is the FSDP root and
    every group a unit resharded after its forward.

    stacks: expert stack [N, *shape] per tensor name (a lazy mapping may load each on
    access: every stack is read once, group by group); trained: the names whose
    coefficients train (the rest keep 1/N); shard: called with each group once built
    (distributed.Ranks.shard makes it an FSDP unit); lazy: build no group until `load`."""

    def __init__(
        self,
        skeleton: torch.nn.Module,
        stacks: Mapping[str, torch.Tensor],
        trained: Optional[Set[str]] = None,
        nonlinearity: str = "none",
        recompute: bool = False,
        shard: Optional[Callable] = None,
        lazy: bool = False,
    ):
        super().__init__()
        # not a submodule: its parameters are meta placeholders that functional_call replaces
        object.__setattr__(self, "skeleton", skeleton)
        expected = {name for name, _ in skeleton.named_parameters()}
        missing, extra = expected - set(stacks), set(stacks) - expected
        if (missing, extra) == (set(), {"lm_head.weight"}) and getattr(skeleton.config, "tie_word_embeddings", False):
            raise DamError(
                "dam: the inputs mix tied and untied embeddings: the base/first model ties lm_head to the embedding "
                "(tie_word_embeddings) but an input has its own lm_head; use a base with an untied lm_head"
            )
        if missing or extra:
            raise DamError(
                "dam: the checkpoints' tensors do not match the model class built from the config "
                f"(missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}); DAM training needs "
                "checkpoints whose tensor names are the transformers model's own"
            )
        self.kinds = tensor_kinds(skeleton)
        trained = set(stacks) if trained is None else set(trained)
        self.recompute = recompute
        self.selection: Optional[int] = None
        self.intercept: Optional[Callable] = None  # see layerwise.py
        self.collected: Dict[str, torch.Tensor] = {}

        prefix, layers = decoder_layers(skeleton)
        embedding = skeleton.get_input_embeddings()
        embed_prefix = next(name for name, module in skeleton.named_modules() if module is embedding)
        members: Dict[str, List[str]] = {"embed": []}
        members.update({f"layer{b}": [] for b in range(len(layers))})
        members["head"] = []
        local_names: Dict[str, str] = {}  # name inside its decoder layer
        for name in sorted(stacks):
            if name.startswith(prefix + "."):
                index, local = name[len(prefix) + 1 :].split(".", 1)
                members[f"layer{index}"].append(name)
                local_names[name] = local
            elif name.startswith(embed_prefix + "."):
                members["embed"].append(name)
            else:
                members["head"].append(name)
        self.members, self.local_names = members, local_names
        self._stacks, self._trained, self._nonlinearity, self._shard = stacks, trained, nonlinearity, shard
        self.groups = torch.nn.ModuleDict()
        if not lazy:
            for key in members:
                self.load(key)
        for index in range(len(layers)):
            if not isinstance(layers[index], MergedBlock):
                layers[index] = MergedBlock(layers[index], index, self)
        object.__setattr__(self, "blocks", list(layers))  # the skeleton's, not submodules here

    def load(self, key: str) -> TensorGroup:
        """Build group `key` ("embed", "layerB", "head"): read its stacks, 1/N coefficients."""
        names = self.members[key]
        stacks = [self._stacks[name] for name in names]
        n = stacks[0].shape[0] if stacks else 1
        device = stacks[0].device if stacks else None
        coefficients = Coefficients([s.shape[-1] for s in stacks], [name in self._trained for name in names], n, self._nonlinearity, device)
        group = TensorGroup([self.local_names.get(name, name) for name in names], names, stacks, coefficients)
        del stacks
        if self._shard is not None:
            self._shard(group)
        self.groups[key] = group
        return group

    def unload(self, key: str) -> None:
        del self.groups[key]

    # --- forwards -------------------------------------------------------------------

    def outer_weights(self, selection: Optional[int]) -> tuple:
        weights, tables = {}, {}
        for key in ("embed", "head"):
            w, t = self.groups[key](selection)
            weights.update(w)
            tables.update(t)
        return weights, tables

    def forward(self, selection: Optional[int], input_ids, attention_mask, weights=None, inputs_embeds=None) -> tuple:
        """(logits, trained tables by full name) of the merged model (selection None) or
        expert `selection`. `weights`: outer (embedding, head) weights to use instead of
        the groups'; `inputs_embeds` instead of `input_ids` (see layerwise.py)."""
        self.selection, self.collected = selection, {}
        try:
            if weights is None:
                weights, tables = self.outer_weights(selection)
            else:
                tables = {}
            inputs = dict(input_ids=input_ids) if inputs_embeds is None else dict(inputs_embeds=inputs_embeds)
            output = functional_call(
                self.skeleton, weights, args=(), kwargs=dict(**inputs, attention_mask=attention_mask, use_cache=False),
            )
            return output.logits, {**tables, **self.collected}
        finally:
            self.selection, self.collected = None, {}

    def merged_logits(self, input_ids, attention_mask) -> tuple:
        return self(None, input_ids, attention_mask)

    def expert_logits(self, index: int, input_ids, attention_mask) -> torch.Tensor:
        return self(index, input_ids, attention_mask)[0]

    # --- coefficients ---------------------------------------------------------------

    def raw_parameters(self) -> Dict[str, torch.nn.Parameter]:
        """The trainable raw coefficients by full tensor name."""
        result = {}
        for group in self.groups.values():
            raw = iter(group.coefficients.raw)
            for name, t in zip(group.full_names, group.coefficients.trained):
                if t:
                    result[name] = next(raw)
        return result

    def tables(self) -> Dict[str, torch.Tensor]:
        """Effective coefficients [N, D] of every tensor, detached, float32, on CPU."""
        result = {}
        with torch.no_grad():
            for group in self.groups.values():
                for name, table in group("tables")[1].items():  # through forward: FSDP gathers the group
                    result[name] = table.detach().float().cpu()
        return result


def stack_experts(tensors, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[N, *shape] in `dtype` on `device`, filled one expert at a time (no extra copy)."""
    tensors = list(tensors)
    stack = torch.empty((len(tensors), *tensors[0].shape), dtype=dtype, device=device)
    for index, tensor in enumerate(tensors):
        stack[index].copy_(tensor)
    return stack
