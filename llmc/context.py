"""What an algorithm sees of one block: the block, its layout, its plan entries, its cached calls, helpers."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from llmc.models.layout import BlockLayout
from llmc.offload import ActivationStore, OnDisk
from llmc.plan import LayerPlan, Part, QuantPlan, Role
from llmc.quant.fake_linear import FakeQuantLinear
from llmc.quant.primitives import QuantSpec


def to_device(obj: Any, device: torch.device | str) -> Any:
    """Move tensors inside nested tuples/lists/dicts; leave everything else alone."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def hidden_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden-state input of a module call (first positional, else ``hidden_states``)."""
    if args and isinstance(args[0], (torch.Tensor, OnDisk)):
        return args[0]
    if isinstance(kwargs.get("hidden_states"), (torch.Tensor, OnDisk)):
        return kwargs["hidden_states"]
    raise ValueError(f"cannot find the hidden-state input among args={len(args)} kwargs={sorted(kwargs)}")


def with_hidden_input(args: tuple, kwargs: dict, x: torch.Tensor) -> tuple[tuple, dict]:
    """The same call with its hidden-state input replaced by ``x``."""
    if args and isinstance(args[0], (torch.Tensor, OnDisk)):
        return (x, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": x}


def first_tensor(out: Any) -> torch.Tensor:
    """Modules return a tensor or a tuple whose first item is the hidden state."""
    return out if isinstance(out, torch.Tensor) else out[0]


@dataclass
class CachedCall:
    """One recorded call of a block: its inputs and the per-token weight of its hidden state.

    ``token_weight`` has the hidden state's leading shape (``[B, T]``), 0 on padding, the user's
    ``quant.token_weight`` elsewhere; None means every row counts with weight 1 (vision blocks).
    """

    args: tuple
    kwargs: dict
    token_weight: torch.Tensor | None = None
    block_kwargs: dict[int, dict] | None = None  # captured call kwargs by block index (block kinds)
    extras: dict | None = None  # what the adapter adds between blocks (ModelAdapter.between_blocks)

    def with_hidden(self, x: torch.Tensor) -> "CachedCall":
        args, kwargs = with_hidden_input(self.args, self.kwargs, x)
        return replace(self, args=args, kwargs=kwargs)

    def kwargs_for(self, source: int) -> dict:
        """Call kwargs captured at block ``source`` (block 0's are ``kwargs``)."""
        if source == 0 or self.block_kwargs is None:
            return self.kwargs
        return self.block_kwargs[source]

    def for_block(self, kwargs: dict) -> "CachedCall":
        """The same hidden state, called with ``kwargs``."""
        if self.args:
            return replace(self, kwargs={k: v for k, v in kwargs.items() if k != "hidden_states"})
        return replace(self, kwargs={**kwargs, "hidden_states": self.kwargs["hidden_states"]})


def flatten_rows(x: torch.Tensor, weight: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[..., C] -> [N, C]`` rows with non-zero weight, and their weights ``[N]``."""
    rows = x.reshape(-1, x.shape[-1])
    if weight is None:
        return rows, None
    w = weight.reshape(-1).to(rows.device)
    if w.numel() != rows.shape[0]:
        raise ValueError(f"token weight of {w.numel()} rows does not match an input of {rows.shape[0]} rows")
    keep = w > 0
    if bool(keep.all()):  # no padding: no copy
        return rows, w.float()
    return rows[keep], w[keep].float()


@dataclass
class BlockContext:
    """One block of one part, ready for an algorithm; ``plan`` says how each of its linears is quantized."""

    part: Part
    index: int
    prefix: str
    block: nn.Module
    layout: BlockLayout
    calls: list[CachedCall]
    device: torch.device
    plan: QuantPlan
    store: ActivationStore | None = None  # where the calls' hidden states wait (None: on the device)

    def resident(self, call: CachedCall) -> CachedCall:
        """``call`` with its hidden state on the compute device (read back from its store)."""
        if self.store is None:
            return call
        return call.with_hidden(self.store.get(hidden_input(call.args, call.kwargs)))

    def get(self, name: str) -> nn.Module:
        return self.block.get_submodule(name)

    def full_name(self, name: str) -> str:
        return f"{self.prefix}.{name}"

    def layer(self, name: str) -> LayerPlan | None:
        """The plan entry of the block's linear ``name`` (None: not in the plan)."""
        return self.plan.get(self.full_name(name))

    def spec(self, name: str) -> QuantSpec | None:
        """Quant spec of the block's linear ``name``; None when it is kept float."""
        return self.plan.spec(self.full_name(name))

    def has_role(self, name: str, role: Role) -> bool:
        layer = self.layer(name)
        return layer is not None and role in layer.roles

    @torch.no_grad()
    def run(self) -> list[torch.Tensor]:
        """Block outputs for every cached call."""
        return [first_tensor(self.block(*c.args, **c.kwargs)) for c in map(self.resident, self.calls)]

    @contextmanager
    def recording(self, names: Sequence[str]) -> Iterator[dict[str, list[tuple[tuple, dict]]]]:
        """Record the calls (args, kwargs) made to submodules ``names`` while inside."""
        names = list(dict.fromkeys(names))
        record: dict[str, list[tuple[tuple, dict]]] = {n: [] for n in names}
        hooks = []
        for n in names:
            def hook(mod, args, kwargs, _n=n):
                record[_n].append((args, kwargs))
            hooks.append(self.get(n).register_forward_pre_hook(hook, with_kwargs=True))
        try:
            yield record
        finally:
            for h in hooks:
                h.remove()

    def record_calls(self, names: Sequence[str]) -> dict[str, list[tuple[tuple, dict]]]:
        """Run the block once over all calls and return each submodule's calls, one per block call."""
        with self.recording(names) as rec:
            self.run()
        for n, calls in rec.items():
            if len(calls) != len(self.calls):
                raise RuntimeError(f"{self.full_name(n)} was called {len(calls)} times for "
                                   f"{len(self.calls)} block calls")
        return rec

    def inputs(self, names: Sequence[str]) -> dict[str, list[torch.Tensor]]:
        """The hidden-state input of each submodule, per block call."""
        return {n: [hidden_input(a, k) for a, k in calls] for n, calls in self.record_calls(names).items()}

    def reads_hidden(self, name: str) -> bool:
        """Does linear ``name`` read the block's token rows (so token weights apply to its input)?"""
        return not self.has_role(name, Role.READS_OTHER)

    def weights_for(self, name: str) -> list[torch.Tensor | None]:
        """Per-call token weights of linear ``name``'s input rows (None: every row counts)."""
        keep = self.reads_hidden(name)
        return [c.token_weight if keep else None for c in self.calls]

    @torch.no_grad()
    def stream_inputs(self, names: Sequence[str],
                      fn: Callable[[str, torch.Tensor, torch.Tensor | None], None]) -> None:
        """One pass over the calls; ``fn(name, input, token_weight)`` for each call of each linear.

        Statistics (Hessians, maxima) are reduced on the fly, nothing is kept.
        """
        names = list(dict.fromkeys(names))
        current: list[CachedCall | None] = [None]
        counts = dict.fromkeys(names, 0)
        keep = {n: self.reads_hidden(n) for n in names}

        def make_hook(n: str):
            def hook(mod, args, kwargs):
                counts[n] += 1
                fn(n, hidden_input(args, kwargs), current[0].token_weight if keep[n] else None)
            return hook

        hooks = [self.get(n).register_forward_pre_hook(make_hook(n), with_kwargs=True) for n in names]
        try:
            for call in map(self.resident, self.calls):
                current[0] = call
                self.block(*call.args, **call.kwargs)
        finally:
            for h in hooks:
                h.remove()
        for n, c in counts.items():
            if c != len(self.calls):
                raise RuntimeError(f"{self.full_name(n)} was called {c} times for {len(self.calls)} block calls")

    def quantize(self, name: str, scale: torch.Tensor | None = None, zero: torch.Tensor | None = None,
                 g_idx: torch.Tensor | None = None) -> FakeQuantLinear | None:
        """Replace linear ``name`` by its fake-quant version (min/max RTN unless params are given)."""
        layer = self.layer(name)
        lin = self.get(name)
        if layer is None or layer.spec is None or isinstance(lin, FakeQuantLinear):
            return None
        fq = FakeQuantLinear.from_linear(lin, layer, scale, zero, g_idx)
        parent_name, _, child = name.rpartition(".")
        parent = self.get(parent_name) if parent_name else self.block
        setattr(parent, child, fq)
        return fq
