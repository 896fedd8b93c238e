"""The merged-model view: the skeleton (skeleton.py), built once, computing with merged
weights W = sum_i f(c_i)[None, :] * W_i (or with one expert's own weights).

The tensors are split into groups (expert_group.py), the units that are merged together
(and that FSDP shards): the input embedding, each decoder layer, and the head (final norm,
lm_head). Each decoder layer of the skeleton is wrapped in a `MergedBlock` that builds its
group's merged weights only when the layer runs, so one layer's merged copy exists at a
time. What backward keeps of a merged layer is `recompute`'s choice: "layer" checkpoints
the whole layer (backward reruns it: least memory, about 1/3 more compute); "weights"
keeps the activations but no merged weight (backward rebuilds each from its coefficients,
one merge per weight: the memory of one merged model less, almost no compute); "none"
keeps everything.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Optional, Set

import torch
from torch.autograd.graph import saved_tensors_hooks
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from mergekit_dam.core.artifact import ROWS
from mergekit_dam.core.errors import DamError
from mergekit_dam.core.parametrizations import Weights
from mergekit_dam.training.coefficients import Coefficients
from mergekit_dam.training.expert_group import ExpertGroup, RebuiltWeights
from mergekit_dam.training.skeleton import decoder_layers, decoder_zeros, tensor_kinds


class MergedBlock(torch.nn.Module):
    """Decoder layer `index` of the skeleton. In a forward of the view it does what that
    forward's plan says (see `_Plan`); otherwise it is the stock layer."""

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
        return self.view._plan.block(self, hidden_states, args, kwargs)

    def run(self, selection: Optional[int], hidden_states, *args, **kwargs) -> tuple:
        """(layer output, trained tables) with merged (None) or expert `selection` weights."""
        group = self.view.groups[f"layer{self.index}"]
        training = selection is None and torch.is_grad_enabled()
        rebuilt = RebuiltWeights() if training and self.view.recompute == "weights" else None

        def compute(hidden_states, *args, **kwargs):
            weights, tables = group(selection, rebuilt)
            # tie_weights=False: a decoder layer ties nothing, and looking for ties walks the layer on every call
            return functional_call(self.layer, weights, (hidden_states, *args), kwargs, tie_weights=False), tables

        if training and self.view.recompute == "layer":
            return checkpoint(compute, hidden_states, *args, use_reentrant=False, **kwargs)
        if rebuilt is not None:
            with saved_tensors_hooks(rebuilt.pack, RebuiltWeights.unpack):
                result = compute(hidden_states, *args, **kwargs)
            rebuilt.close()
            return result
        return compute(hidden_states, *args, **kwargs)


class _Plan:
    """What each decoder layer does in one forward of the stock model, and the trained
    tables the layers that ran produced. Layers in `run` (all when None) compute with
    `selection`'s weights; `inputs` replaces the hidden states entering a layer; every
    other layer passes its input through, recording it and its arguments in `seen`."""

    def __init__(self, selection: Optional[int] = None, run: Optional[Set[int]] = None, inputs: Optional[Dict[int, torch.Tensor]] = None):
        self.selection, self.run, self.inputs = selection, run, inputs or {}
        self.tables: Dict[str, torch.Tensor] = {}
        self.seen: Dict[int, tuple] = {}

    def block(self, block: MergedBlock, hidden, args, kwargs):
        hidden = self.inputs.get(block.index, hidden)
        if self.run is not None and block.index not in self.run:
            self.seen[block.index] = (hidden, args, kwargs)
            return hidden
        output, tables = block.run(self.selection, hidden, *args, **kwargs)
        self.tables.update(tables)
        return output


class MergedModel(torch.nn.Module):
    """Forward passes of the merged model and of each expert through one skeleton.

    A Module whose submodules are the groups, so that sharded, it is the FSDP root and
    every group a unit resharded after its forward.

    stacks: expert stack [N, *shape] per tensor name (a lazy mapping may load each on
    access: every stack is read once, group by group); trained: the names whose
    coefficients train (the rest keep their start); parametrization: N -> parametrizations.Weights
    or TaskVectors (how raw coefficients become the [N, D] table); granularity: one
    coefficient per column, tensor or layer (Coefficients); starts: full name -> the [N, D]
    table to start from (a warm start; default: the parametrization's start); shard: called with each group once built
    (distributed.Ranks.shard makes it an FSDP unit); lazy: build no group until `load`."""

    def __init__(
        self,
        skeleton: torch.nn.Module,
        stacks: Mapping[str, torch.Tensor],
        trained: Optional[Set[str]] = None,
        nonlinearity: str = "none",
        recompute: str = "none",
        shard: Optional[Callable] = None,
        lazy: bool = False,
        parametrization: Optional[Callable[[int], object]] = None,
        granularity: str = "column",
        starts: Optional[Callable[[str], torch.Tensor]] = None,
    ):
        super().__init__()
        # not a submodule: its parameters are meta placeholders that functional_call replaces
        object.__setattr__(self, "skeleton", skeleton)
        _check_tensor_names(skeleton, stacks)
        self.kinds = tensor_kinds(skeleton)
        trained = set(stacks) if trained is None else set(trained)
        self.recompute = recompute  # "layer", "weights" or "none" (see the module's docstring)
        self._plan = _Plan()  # the plan of the forward in progress (every layer runs merged outside one)

        prefix, layers = decoder_layers(skeleton)
        self.decoder_prefix = prefix.rsplit(".", 1)[0]  # the module that runs the layers (e.g. "model")
        self._decoder_zeros = decoder_zeros(skeleton, prefix)
        members, local_names = group_members(skeleton, stacks, prefix, len(layers))
        self.members, self.local_names = members, local_names
        self._stacks, self.trained_names, self._nonlinearity, self._shard = stacks, trained, nonlinearity, shard
        self._parametrization = parametrization or Weights  # rows -> Weights or TaskVectors
        self._granularity = granularity  # "column", "tensor" or "layer" (Coefficients)
        self._starts = starts  # full name -> [N, D] starting table (a warm start), or None
        self.groups = torch.nn.ModuleDict()
        if not lazy:
            for key in members:
                self.load(key)
        for index in range(len(layers)):
            if not isinstance(layers[index], MergedBlock):
                layers[index] = MergedBlock(layers[index], index, self)
        object.__setattr__(self, "blocks", list(layers))  # the skeleton's, not submodules here

    def load(self, key: str) -> ExpertGroup:
        """Build group `key` ("embed", "layerB", "head"): read its stacks, 1/N coefficients."""
        names = self.members[key]
        stacks = [self._stacks[name] for name in names]
        n = stacks[0].shape[0] if stacks else 1
        device = stacks[0].device if stacks else None
        heights = [s.shape[1] if key.startswith("layer") and s.ndim == 3 else None for s in stacks]  # decoder matrices' output rows
        coefficients = Coefficients([s.shape[-1] for s in stacks], [name in self.trained_names for name in names],
                                    self._parametrization(n), self._nonlinearity, device, self._granularity,
                                    [self._starts(name) for name in names] if self._starts else None, heights)
        group = ExpertGroup([self.local_names.get(name, name) for name in names], names, stacks, coefficients)
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

    def forward(self, selection: Optional[int], input_ids, attention_mask, position_ids=None) -> tuple:
        """(logits, trained tables by full name) of the merged model (selection None) or
        of expert `selection`. Packed rows (packing.py) come with `position_ids` and no
        attention mask."""
        weights, tables = self.outer_weights(selection)
        positions = {} if position_ids is None else {"position_ids": position_ids}
        logits, plan = self._run(_Plan(selection), weights, attention_mask, input_ids=input_ids, **positions)
        return logits, {**tables, **plan.tables}

    def merged_logits(self, input_ids, attention_mask, position_ids=None) -> tuple:
        return self(None, input_ids, attention_mask, position_ids)

    def expert_logits(self, index: int, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
        return self(index, input_ids, attention_mask, position_ids)[0]

    # --- one layer at a time (layerwise.py) ----------------------------------------------
    # Every layer runs through the stock model's forward, which builds its masks and
    # position embeddings; layers outside the plan pass their input through.

    def embedding_output(self, input_ids, attention_mask, weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The hidden states entering layer 0, from the input embedding in `weights`."""
        plan = self._run(_Plan(run=set()), weights, attention_mask, decoder_only=True, input_ids=input_ids)[1]
        return plan.seen[0][0]

    def layer_output(self, index: int, selection: Optional[int], hidden, attention_mask) -> tuple:
        """(output of layer `index` for input `hidden`, its trained tables)."""
        plan = self._run(_Plan(run=set()), {}, attention_mask, decoder_only=True, inputs_embeds=torch.zeros_like(hidden))[1]
        _, args, kwargs = plan.seen[index]
        return self.blocks[index].run(selection, hidden, *args, **kwargs)

    def final_logits(self, selection: Optional[int], hidden, attention_mask, weights: Mapping[str, torch.Tensor]) -> tuple:
        """(logits, trained tables of the last layer) from the hidden states entering the
        last layer, with the head (and tied embedding) weights in `weights`."""
        last = len(self.blocks) - 1
        logits, plan = self._run(_Plan(selection, run={last}, inputs={last: hidden}), weights, attention_mask,
                                 inputs_embeds=torch.zeros_like(hidden))
        return logits, plan.tables

    def _run(self, plan: _Plan, weights, attention_mask, decoder_only: bool = False, **inputs) -> tuple:
        """(logits, plan) of one forward of the stock model under `plan`; `decoder_only`:
        the decoder without the head (no logits), when only the layers' inputs matter."""
        module, names = self.skeleton, dict(weights)
        if decoder_only:
            module = self.skeleton.get_submodule(self.decoder_prefix)
            start = len(self.decoder_prefix) + 1
            names = {name[start:]: weight for name, weight in names.items() if name.startswith(self.decoder_prefix + ".")}
            names = {**self._decoder_zeros, **names}
        self._plan = plan
        try:
            output = functional_call(module, names, args=(), kwargs=dict(**inputs, attention_mask=attention_mask, use_cache=False))
        finally:
            self._plan = _Plan()
        return (None if decoder_only else output.logits), plan

    # --- coefficients ---------------------------------------------------------------

    def raw_parameters(self) -> Dict[str, torch.nn.Parameter]:
        """The trainable raw coefficients by full tensor name (by group name, e.g.
        `layer3`, with granularity: layer)."""
        result = {}
        for key, group in self.groups.items():
            coefficients = group.coefficients
            if coefficients.granularity == "layer":
                result.update({key: coefficients.raw[0]} if len(coefficients.raw) else {})
                continue
            raw, rows = iter(coefficients.raw), iter(coefficients.row_factors)
            for name, t, height in zip(group.full_names, coefficients.trained, coefficients.heights):
                if t:
                    result[name] = next(raw)
                if height is not None:
                    result[name + ROWS] = next(rows)
        return result

    def tables(self) -> Dict[str, torch.Tensor]:
        """Effective coefficients [N, D] of every tensor, detached, float32, on CPU."""
        return {name: table for group in self.groups.values() for name, table in group.tables().items()}


def _check_tensor_names(skeleton: torch.nn.Module, stacks: Mapping[str, torch.Tensor]) -> None:
    """The checkpoints hold exactly the model class's parameters (by name)."""
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


def group_members(skeleton: torch.nn.Module, names, layers_prefix: str, layers: int) -> tuple:
    """({group key: its tensor names}, {name of a layer's tensor: its name inside the layer}):
    the input embedding's tensors in "embed", decoder layer b's in "layer<b>", the rest
    (final norm, lm_head) in "head"."""
    embedding = skeleton.get_input_embeddings()
    embed_prefix = next(name for name, module in skeleton.named_modules() if module is embedding)
    members: Dict[str, List[str]] = {"embed": []}
    members.update({f"layer{b}": [] for b in range(layers)})
    members["head"] = []
    local_names: Dict[str, str] = {}
    for name in sorted(names):
        if name.startswith(layers_prefix + "."):
            index, local = name[len(layers_prefix) + 1 :].split(".", 1)
            members[f"layer{index}"].append(name)
            local_names[name] = local
        elif name.startswith(embed_prefix + "."):
            members["embed"].append(name)
        else:
            members["head"].append(name)
    return members, local_names
