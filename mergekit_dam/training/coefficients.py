"""One group's coefficient tables: the raw float32 parameters that train, and how they
become the effective [N, D] tables the merge applies (nonlinearity, parametrization,
granularity)."""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch

from mergekit_dam.core.parametrizations import DOMAINS, NONLINEARITIES


class Coefficients(torch.nn.Module):
    """One group's coefficient tables: raw float32 parameters for the tensors that train
    (effective [N, D] table = parametrization.table(f(raw))), fixed starting tables for the rest.

    granularity: `column` (one coefficient per input column, the paper's DAM), `tensor`
    (one per tensor, raw [rows, 1]) or `layer` (one per group, shared by its tensors);
    the coarser tables are broadcast to [N, D], so merging and the artifact are unchanged.
    `row_column`: columns as `column`, plus one factor per output row of each tensor given a
    height (`row_factors`, `row_tables`; kernels.combine_rows merges them)."""

    def __init__(self, widths: Sequence[int], trained: Sequence[bool], parametrization, nonlinearity: str, device,
                 granularity: str = "column", starts: Optional[Sequence[Optional[torch.Tensor]]] = None,
                 heights: Optional[Sequence[Optional[int]]] = None):
        super().__init__()
        # granularity row_column: trained tensors with a height (a decoder-layer matrix's output
        # rows) also learn one factor per row, starting at 1 (so the start is the column start)
        self.heights = [h if t and granularity == "row_column" else None for h, t in zip(heights or [None] * len(widths), trained)]
        self.row_factors = torch.nn.ParameterList([torch.nn.Parameter(torch.ones(parametrization.rows, h, device=device))
                                            for h in self.heights if h is not None])
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
        return values if self.granularity in ("column", "row_column") else values.mean(dim=1, keepdim=True)

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

    def row_tables(self, gather: Callable = lambda raw: raw) -> List[Optional[torch.Tensor]]:
        """Every tensor's [N, out] row factors (None without): the trained rows, with a row of
        ones for the base under task vectors (never read: its coefficient is the complement)."""
        rows, tables = iter(self.row_factors), []
        for height in self.heights:
            if height is None:
                tables.append(None)
                continue
            values = gather(next(rows))
            base_row = getattr(self.parametrization, "base_row", None)
            if base_row is not None:
                values = torch.cat([values[:base_row], torch.ones_like(values[:1]), values[base_row:]])
            tables.append(values)
        return tables
