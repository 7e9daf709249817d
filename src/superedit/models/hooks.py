"""The one hook primitive: read or replace sites during a forward pass.

Example::

    with Trace(adapter, reads=[("key", 3), ("resid", 5)], stop_after=True) as tr:
        adapter.model(**batch)          # stops right after block 5
    keys = tr["key", 3]                  # (batch, seq, d_mlp)

    # patch the value at layer 4, token 7 with v
    with Trace(adapter, edits={("value", 4): at_positions([7], v)}):
        logits = adapter.model(**batch).logits

Hooks are always removed on exit, also when the forward raises. A ``StopForward`` raised by
``stop_after`` is swallowed by the context manager.

:class:`StartAt` resumes a forward pass at a block from that block's cached input (the blocks
below compute nothing), for loops whose changes all lie at or above one layer (v* optimisation)::

    with Trace(adapter, reads=[("resid", 3)], stop_after=True) as tr:
        adapter.model(**batch)                              # blocks 0..3, once
    with StartAt(adapter, 4, tr["resid", 3], tr.arity["resid", 3]):
        logits = adapter.model(**batch).logits              # blocks 4.. only, same logits
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from .adapter import SITES, ModelAdapter

Edit = Callable[[torch.Tensor], torch.Tensor]
_ORDER = {"attn": 0, "key": 1, "value": 2, "resid": 3}  # execution order inside a block


class StopForward(Exception):
    """Raised inside a hook to end the forward pass early; swallowed by :class:`Trace`."""


def _split(out):
    """(tensor, rebuild) for a module output that is a tensor or a tuple whose first item is one."""
    if isinstance(out, torch.Tensor):
        return out, lambda t: t
    if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
        return out[0], lambda t: (t,) + tuple(out[1:])
    raise TypeError(f"cannot hook a module output of type {type(out).__name__}")


class Trace:
    """Read and/or replace ``(site, layer)`` tensors of shape (batch, seq, width).

    Args:
        adapter: the model.
        reads: sites to record; afterwards ``trace[site, layer]`` gives the tensor.
        edits: ``{(site, layer): fn}``; ``fn(tensor) -> tensor`` computes the replacement
            (applied before recording, so reads of an edited site see the edited tensor).
        stop_after: raise :class:`StopForward` right after the last site in ``reads``/``edits``
            has been computed, skipping the rest of the network.
        detach: detach recorded tensors (set False to backpropagate through them).
    """

    def __init__(self, adapter: ModelAdapter, reads: Iterable[tuple[str, int]] = (),
                 edits: dict[tuple[str, int], Edit] | None = None, stop_after: bool = False, detach: bool = True):
        self.adapter = adapter
        self.reads = list(dict.fromkeys((s, int(l)) for s, l in reads))
        self.edits = dict(edits or {})
        self.stop_after = stop_after
        self.detach = detach
        self.outputs: dict[tuple[str, int], torch.Tensor] = {}
        #: how each hooked module returned its tensor: None (a bare tensor) or the tuple's length
        #: (what :class:`StartAt` needs to stand in for a block)
        self.arity: dict[tuple[str, int], int | None] = {}
        self._handles: list = []
        sites = set(self.reads) | set(self.edits)
        for site, layer in sites:
            if site not in SITES:
                raise ValueError(f"unknown site {site!r}; expected one of {SITES}")
            adapter.check_layer(layer)
        self._last = max(sites, key=lambda sl: (sl[1], _ORDER[sl[0]])) if (sites and stop_after) else None

    def __getitem__(self, key: tuple[str, int]) -> torch.Tensor:
        if key not in self.outputs:
            raise KeyError(f"{key} was not recorded (reads={self.reads}); did the forward pass reach it?")
        return self.outputs[key]

    def _process(self, key, tensor):
        if key in self.edits:
            tensor = self.edits[key](tensor)
        if key in self.reads:
            self.outputs[key] = tensor.detach() if self.detach else tensor
        return tensor

    def _maybe_stop(self, key):
        if key == self._last:
            raise StopForward()

    def _make_output_hook(self, key):
        def hook(module, args, out):
            tensor, rebuild = _split(out)
            self.arity[key] = None if isinstance(out, torch.Tensor) else len(out)
            new = self._process(key, tensor)
            result = rebuild(new) if key in self.edits else None
            self._maybe_stop(key)
            return result

        return hook

    def _make_input_hook(self, key):
        def hook(module, args):
            new = self._process(key, args[0])
            self._maybe_stop(key)
            return (new,) + tuple(args[1:]) if key in self.edits else None

        return hook

    def __enter__(self) -> "Trace":
        try:
            for key in sorted(set(self.reads) | set(self.edits)):
                site, layer = key
                mod = self.adapter.site_module(site, layer)
                if site == "key":
                    self._handles.append(mod.register_forward_pre_hook(self._make_input_hook(key)))
                else:
                    self._handles.append(mod.register_forward_hook(self._make_output_hook(key)))
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.remove()
        return exc_type is not None and issubclass(exc_type, StopForward)


class StartAt:
    """Run forward passes from block ``layer`` on, from its cached input ``hidden``.

    Inside the ``with``, blocks ``0 .. layer-1`` are replaced by stand-ins that compute nothing and
    return ``hidden`` (batch, seq, d_model) — the residual entering block ``layer``, i.e. what block
    ``layer-1`` returned (``Trace`` site ``("resid", layer-1)``) for the SAME batch. Everything the model
    computes outside its blocks (embeddings, position ids, rotary tables, attention masks) is still
    its own, so the blocks from ``layer`` on see exactly what a full forward gives them: the output
    equals the full forward's (to float rounding). ``arity`` is how the block returns its hidden state:
    None for a bare tensor (transformers 5), else the length of the tuple it returns (the stand-in
    returns ``(hidden, None, ...)``; pass ``use_cache=False``). Read it from ``Trace.arity``.

    The stand-ins check that the batch they receive has ``hidden``'s (batch, seq) and raise
    ValueError otherwise. The original blocks are restored on exit, also when the forward raises
    (a forward accelerate set on the instance for a ``--device-map`` is put back as it was).
    ``layer == 0`` changes nothing (no block below).
    """

    def __init__(self, adapter: ModelAdapter, layer: int, hidden: torch.Tensor, arity: int | None = None):
        adapter.check_layer(layer)
        self.adapter, self.layer, self.hidden, self.arity = adapter, layer, hidden, arity
        self._patched: list = []  # (block, the instance's own forward before, or None)

    def _stand_in(self, *args, **kwargs):
        x = args[0] if args else kwargs.get("hidden_states")
        if x is not None and tuple(x.shape[:2]) != tuple(self.hidden.shape[:2]):
            raise ValueError(f"StartAt: the cached block input has (batch, seq) {tuple(self.hidden.shape[:2])} "
                             f"but the forward pass carries {tuple(x.shape[:2])}; cache it from the same batch")
        h = self.hidden
        return h if self.arity is None else (h,) + (None,) * (self.arity - 1)

    _stand_in._superedit_stand_in = True  # how a nested StartAt is recognised

    def __enter__(self) -> "StartAt":
        blocks = self.adapter.blocks()
        try:
            for i in range(self.layer):
                own = vars(blocks[i]).get("forward")
                if getattr(own, "_superedit_stand_in", False):
                    raise RuntimeError(f"block {i} already has a StartAt stand-in (nested StartAt?)")
                blocks[i].forward = self._stand_in
                self._patched.append((blocks[i], own))
        except BaseException:
            self._restore()
            raise
        return self

    def _restore(self) -> None:
        for block, own in reversed(self._patched):
            vars(block).pop("forward", None)
            if own is not None:  # e.g. accelerate's device-aligning forward
                block.forward = own
        self._patched.clear()

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._restore()
        return False


def at_positions(positions, new: torch.Tensor) -> Edit:
    """Edit that writes ``new`` at token ``positions``.

    ``positions`` is a list with one int per batch row (or a single int for all rows);
    ``new`` is (width,), (batch, width) or broadcastable to the selected rows.
    """

    def fn(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        rows = torch.arange(t.shape[0], device=t.device)
        new_t = new.to(t.device, t.dtype)  # with a --device-map, t sits where its layer runs
        t[rows, _positions(positions, t)] = new_t.expand(t.shape[0], -1) if new.dim() == 1 else new_t
        return t

    return fn


def add_at_positions(positions, delta: torch.Tensor) -> Edit:
    """Edit that adds ``delta`` at one token per row (keeps the autograd graph of ``delta``).

    ``delta`` is (width,) — the same vector in every row — or (rows, width), one vector per row."""

    def fn(t: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(t.shape[0], device=t.device)
        mask = torch.zeros(t.shape[:2], dtype=t.dtype, device=t.device)
        mask[rows, _positions(positions, t)] = 1
        d = delta.to(t.device, t.dtype)  # keeps the graph; with a --device-map, t sits where its layer runs
        if d.dim() == 2:
            if d.shape[0] != t.shape[0]:
                raise ValueError(f"{d.shape[0]} delta rows for a batch of {t.shape[0]} rows")
            d = d[:, None, :]
        return t + mask.unsqueeze(-1) * d

    return fn


def _positions(positions, t: torch.Tensor) -> torch.Tensor:
    """One token index per batch row of ``t`` from an int or a per-row sequence."""
    pos = torch.as_tensor(positions, device=t.device, dtype=torch.long).reshape(-1)
    if pos.numel() == 1:
        pos = pos.expand(t.shape[0])
    if pos.numel() != t.shape[0]:
        raise ValueError(f"{pos.numel()} positions for a batch of {t.shape[0]} rows")
    return pos
