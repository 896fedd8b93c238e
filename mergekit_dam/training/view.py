"""The merged-model view: the stock Hugging Face model, built once, computing with
merged weights W = sum_i f(c_i)[None, :] * W_i (or with one expert's own weights).

No per-architecture code and no modelling files: the skeleton is instantiated from the
output config with parameters on the meta device (buffers such as rotary frequencies
stay real), and weights are substituted with torch.func.functional_call. The tensors
are split into groups, the units that are merged together (and that FSDP shards):
the input embedding, each decoder layer, and the head (final norm, lm_head). Each
decoder layer of the skeleton is wrapped in a `MergedBlock` that builds its group's
merged weights only when the layer runs, so one layer's merged copy exists at a time.
What backward keeps of a merged layer is `recompute`'s choice: "layer" checkpoints the
whole layer (backward reruns it: least memory, about 1/3 more compute); "weights" keeps
the activations but no merged weight (backward rebuilds each from its coefficients, one
merge per weight: the memory of one merged model less, almost no compute); "none"
keeps everything.

Merged weights come from `kernels.ColumnMerge`, which keeps nothing for backward but the
coefficients and the (persistent) expert stack.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Optional, Sequence, Set

import torch
from torch.autograd.graph import saved_tensors_hooks
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from mergekit_dam.kernels import ColumnMerge, merge_stack
from mergekit_dam.plugin.config import DamError
from mergekit_dam.training.distributed import full

DOMAINS = {"tanh": (-1 + 1e-6, 1 - 1e-6), "sigmoid": (1e-6, 1 - 1e-6)}  # where f's inverse is finite
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


class ColumnWeights:
    """merged = sum_i c_i * W_i over every row (the paper's DAM); starts at c_i = 1/N."""

    def __init__(self, n: int):
        self.n, self.rows, self.start = n, n, 1.0 / n

    def table(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def values(self, table: torch.Tensor) -> torch.Tensor:
        """The trained rows of a full [N, D] table (the inverse of `table`)."""
        return table


class TaskVectors:
    """merged = W_base + sum_{i != base} c_i * (W_i - W_base): the base row's coefficient
    is 1 - sum_i c_i, so that dL/dc_i = sum_rows dL/dW * (W_i - W_base) and the part the
    experts share with the base cancels. Starts at c_i = `init` (task arithmetic with
    weight λ), or 1/(N-1): the linear average of the experts."""

    def __init__(self, n: int, base_row: int, init: Optional[float] = None):
        self.n, self.rows, self.base_row = n, n - 1, base_row
        self.start = init if init is not None else 1.0 / (n - 1)

    def table(self, values: torch.Tensor) -> torch.Tensor:
        base = 1 - values.sum(dim=0, keepdim=True)
        return torch.cat([values[: self.base_row], base, values[self.base_row :]])

    def values(self, table: torch.Tensor) -> torch.Tensor:
        return torch.cat([table[: self.base_row], table[self.base_row + 1 :]])


def decoder_zeros(skeleton: torch.nn.Module, layers_prefix: str) -> Dict[str, torch.Tensor]:
    """Zeros for the decoder's own 1-D weights (its final norm), by their names inside the
    decoder: a run without the head needs them but never uses them, since the layers'
    inputs and outputs do not pass through them."""
    decoder_prefix, layers_name = layers_prefix.rsplit(".", 1)
    device = next((b.device for b in skeleton.buffers()), torch.device("cpu"))
    return {name: torch.zeros(p.shape, device=device) for name, p in skeleton.get_submodule(decoder_prefix).named_parameters()
            if p.ndim <= 1 and not name.startswith(layers_name + ".")}


class Coefficients(torch.nn.Module):
    """One group's coefficient tables: raw float32 parameters for the tensors that train
    (effective [N, D] table = parametrization.table(f(raw))), fixed starting tables for the rest.

    granularity: `column` (one coefficient per input column, the paper's DAM), `tensor`
    (one per tensor, raw [rows, 1]) or `layer` (one per group, shared by its tensors);
    the coarser tables are broadcast to [N, D], so merging and the artifact are unchanged."""

    def __init__(self, widths: Sequence[int], trained: Sequence[bool], parametrization, nonlinearity: str, device,
                 granularity: str = "column", starts: Optional[Sequence[Optional[torch.Tensor]]] = None):
        super().__init__()
        self.function, inverse = NONLINEARITIES[nonlinearity]
        self.parametrization, self.granularity = parametrization, granularity
        self.widths, self.trained = list(widths), list(trained)
        values = [self._start_values(width, start) for width, t, start in zip(widths, trained, starts or [None] * len(widths)) if t]
        if granularity == "layer":  # one value per row for the whole group: the mean of its tensors'
            values = [torch.stack(values).mean(0)] if values else []
        if nonlinearity in DOMAINS:
            values = [v.clamp(*DOMAINS[nonlinearity]) for v in values]
        self.raw = torch.nn.ParameterList([torch.nn.Parameter(inverse(v).to(device)) for v in values])
        for slot, (width, t) in enumerate(zip(widths, trained)):
            if not t:
                fixed = parametrization.table(torch.full((parametrization.rows, width), parametrization.start, device=device))
                self.register_buffer(f"fixed{slot}", fixed)

    def _start_values(self, width: int, start: Optional[torch.Tensor]) -> torch.Tensor:
        """The trained rows' starting values: a warm-start table's, or the parametrization's start."""
        rows = self.parametrization.rows
        if start is None:
            values = torch.full((rows, width), float(self.parametrization.start))
        else:
            values = self.parametrization.values(start.detach().float().cpu())
        return values if self.granularity == "column" else values.mean(dim=1, keepdim=True)

    def effective(self, raw: torch.Tensor) -> torch.Tensor:
        return self.parametrization.table(self.function(raw))

    def forward(self, gather: Callable = lambda raw: raw) -> List[torch.Tensor]:
        """Every tensor's [N, D] table; `gather` is applied to each raw parameter first."""
        raw, shared, tables = iter(self.raw), None, []
        for slot, (width, t) in enumerate(zip(self.widths, self.trained)):
            if not t:
                tables.append(getattr(self, f"fixed{slot}"))
                continue
            if self.granularity == "layer":
                shared = self.effective(gather(self.raw[0])) if shared is None else shared
                table = shared
            else:
                table = self.effective(gather(next(raw)))
            tables.append(table if table.shape[-1] == width else table.expand(-1, width))
        return tables


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

    def forward(self, selection: Optional[int], rebuilt: Optional["RebuiltWeights"] = None) -> tuple:
        """(weights by name, effective tables of the trained tensors by full name): merged
        weights for selection None, expert `selection`'s own weights for an index.
        `rebuilt`: where to record how each merged weight is made."""
        if selection is not None:
            return {n: s[selection].clone() if self.copy_experts else s[selection] for n, s in zip(self.names, self.stacks)}, {}
        weights, tables = {}, {}
        for name, full_name, stack, table in zip(self.names, self.full_names, self.stacks, self.coefficients()):
            if table.requires_grad:
                weights[name], tables[full_name] = ColumnMerge.apply(table, stack), table
            else:
                weights[name] = merge_stack(table, stack)
            if rebuilt is not None:
                rebuilt.record(weights[name], table, stack)
        return weights, tables

    def tables(self) -> Dict[str, torch.Tensor]:
        """Effective coefficients [N, D] of every tensor by full name, whole (gathered
        from the ranks when sharded), detached, float32, on CPU."""
        with torch.no_grad():
            return {name: table.detach().float().cpu().contiguous() for name, table in zip(self.full_names, self.coefficients(full))}


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


class RebuiltWeights:
    """Saved-tensor hooks for `recompute: weights`: when autograd saves a merged weight
    (or a view of it, such as the transpose a matmul keeps) for backward, keep how to make
    it (its coefficient table and expert stack) instead, and merge it again when backward
    needs it. The same kernel on the same inputs gives the same bits. Merged weights are
    recognised by their storage, which is theirs alone while they are held here."""

    def __init__(self):
        self.made: Dict[int, tuple] = {}  # storage address -> (weight, table, stack)

    def record(self, weight: torch.Tensor, table: torch.Tensor, stack: torch.Tensor) -> None:
        self.made[weight.untyped_storage().data_ptr()] = (weight, table.detach(), stack)

    def pack(self, tensor: torch.Tensor):
        entry = self.made.get(tensor.untyped_storage().data_ptr()) if tensor.device.type != "meta" else None
        if entry is None or entry[0].dtype != tensor.dtype:
            return tensor
        _, table, stack = entry
        return table, stack, tensor.size(), tensor.stride(), tensor.storage_offset()

    @staticmethod
    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        table, stack, size, stride, offset = packed
        with torch.no_grad():
            return merge_stack(table, stack).as_strided(size, stride, offset)

    def close(self) -> None:
        """The layer has run: let its merged weights go."""
        self.made.clear()


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
    coefficients train (the rest keep their start); parametrization: N -> ColumnWeights
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
        self.recompute = recompute  # "layer", "weights" or "none" (see the module's docstring)
        self._plan = _Plan()  # the plan of the forward in progress (every layer runs merged outside one)

        prefix, layers = decoder_layers(skeleton)
        self.decoder_prefix = prefix.rsplit(".", 1)[0]  # the module that runs the layers (e.g. "model")
        self._decoder_zeros = decoder_zeros(skeleton, prefix)
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
        self._stacks, self.trained_names, self._nonlinearity, self._shard = stacks, trained, nonlinearity, shard
        self._parametrization = parametrization or ColumnWeights  # rows -> ColumnWeights or TaskVectors
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

    def load(self, key: str) -> TensorGroup:
        """Build group `key` ("embed", "layerB", "head"): read its stacks, 1/N coefficients."""
        names = self.members[key]
        stacks = [self._stacks[name] for name in names]
        n = stacks[0].shape[0] if stacks else 1
        device = stacks[0].device if stacks else None
        coefficients = Coefficients([s.shape[-1] for s in stacks], [name in self.trained_names for name in names],
                                    self._parametrization(n), self._nonlinearity, device, self._granularity,
                                    [self._starts(name) for name in names] if self._starts else None)
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
            raw = iter(coefficients.raw)
            for name, t in zip(group.full_names, coefficients.trained):
                if t:
                    result[name] = next(raw)
        return result

    def tables(self) -> Dict[str, torch.Tensor]:
        """Effective coefficients [N, D] of every tensor, detached, float32, on CPU."""
        return {name: table for group in self.groups.values() for name, table in group.tables().items()}


def stack_experts(tensors, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[N, *shape] in `dtype` on `device`, filled one expert at a time (no extra copy)."""
    tensors = list(tensors)
    stack = torch.empty((len(tensors), *tensors[0].shape), dtype=dtype, device=device)
    for index, tensor in enumerate(tensors):
        stack[index].copy_(tensor)
    return stack
