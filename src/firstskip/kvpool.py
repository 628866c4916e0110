"""The KV cache of a running batch: per layer, one slot per request that keeps the layer.

Each layer's slots are dense: the requests that keep layer ``l`` occupy slots ``0..n_l-1`` of its
tensors ``[capacity, kv_heads, max_len, head_dim]``, so a decode step hands the layer a *view* of
their histories, never a copy. A request that skips a layer holds nothing there (its prompt KV of
that layer is dropped with the prefill cache). Joining appends a slot; leaving moves the last slot
into the hole, one request's history copied once, not every step. Shapes change only when a
capacity doubles, so a step over them can later be compiled or captured.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch


class LayerSlots:
    """The slots of one decoder layer: keys and values, and which request owns each slot."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None  # [capacity, kv_heads, max_len, head_dim]
        self.values: torch.Tensor | None = None
        self.owners: list[Hashable] = []

    def add(self, owner: Hashable, keys: torch.Tensor, values: torch.Tensor, capacity: int, max_len: int) -> None:
        """Give ``owner`` the next slot, filled with its history ``[kv_heads, T, head_dim]``."""
        if self.keys is None:
            self.keys = keys.new_zeros((capacity, keys.shape[0], max_len, keys.shape[2]))
            self.values = values.new_zeros((capacity, values.shape[0], max_len, values.shape[2]))
        full = len(self.owners) == self.keys.shape[0]
        if full or self.keys.shape[2] < max_len:
            self._grow(2 * self.keys.shape[0] if full else self.keys.shape[0], max(max_len, self.keys.shape[2]))
        slot, length = len(self.owners), keys.shape[1]
        self.keys[slot, :, :length] = keys
        self.values[slot, :, :length] = values
        self.owners.append(owner)

    def remove(self, owner: Hashable) -> None:
        """Free ``owner``'s slot; the last slot moves into it."""
        slot, last = self.owners.index(owner), len(self.owners) - 1
        if slot != last:
            self.keys[slot] = self.keys[last]
            self.values[slot] = self.values[last]
            self.owners[slot] = self.owners[last]
        self.owners.pop()

    def _grow(self, capacity: int, max_len: int) -> None:
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_zeros((capacity, old.shape[1], max_len, old.shape[3]))
            new[:old.shape[0], :, :old.shape[2]] = old
            setattr(self, name, new)

    def nbytes(self) -> int:
        return 0 if self.keys is None else 2 * self.keys.numel() * self.keys.element_size()


class KVPool:
    """The slots of every decoder layer for one running batch.

    ``capacity`` is how many requests a layer's tensors hold before they double, ``max_len`` how
    many positions a request holds at most (prompt + new tokens of the longest request, never the
    model's whole context); both grow when a request that needs more joins. A slot keeps one
    position more: a step's view then never spans a whole tensor, a case a compiled step would
    specialise on and recompile for (seconds, stalling every stream, the first time a request
    reaches its last token in a full slot).
    """

    def __init__(self, num_layers: int, capacity: int, max_len: int) -> None:
        self.layers = [LayerSlots() for _ in range(num_layers)]
        self.capacity, self.max_len = capacity, max_len

    def add(self, owner: Hashable, kv: Sequence[tuple[torch.Tensor, torch.Tensor] | None], length: int) -> None:
        """Give ``owner`` a slot in every layer whose ``kv`` entry is given (the layers it keeps);
        ``length`` is how many positions it will hold at most (prompt + new tokens)."""
        self.max_len = max(self.max_len, length)
        for slots, entry in zip(self.layers, kv):
            if entry is not None:
                slots.add(owner, *entry, self.capacity, self.max_len + 1)  # the spare position

    def remove(self, owner: Hashable) -> None:
        """Free every slot of ``owner``; other requests' slots keep their contents."""
        for slots in self.layers:
            if owner in slots.owners:
                slots.remove(owner)

    def nbytes(self) -> int:
        """Bytes allocated for keys and values across layers."""
        return sum(slots.nbytes() for slots in self.layers)
