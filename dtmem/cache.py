"""The KV cache: preallocated keys and values of every layer for E episode slots.

Appending writes in place at each (layer, slot)'s write pointer; evicting only clears
`valid`; compaction (valid tokens gathered to the front, order kept) runs only when a
(layer, slot) runs out of room. Layers keep their own validity because memory policies
such as NAMM evict per layer, so each layer also has its own write pointer and metadata.
"""

import torch

# Token kinds, in the order a Decision Transformer interleaves them within one timestep.
RETURN, STATE, ACTION = 0, 1, 2


class KVCache:
    def __init__(self, n_layers, n_slots, n_heads, head_dim, capacity, device="cpu",
                 dtype=torch.float32):
        L, E, H, C, D = n_layers, n_slots, n_heads, capacity, head_dim
        self.capacity = C
        self.keys = torch.zeros(L, E, H, C, D, device=device, dtype=dtype)
        self.values = torch.zeros(L, E, H, C, D, device=device, dtype=dtype)
        self.valid = torch.zeros(L, E, C, dtype=torch.bool, device=device)
        self.length = torch.zeros(L, E, dtype=torch.long, device=device)  # write pointer
        # Per-token metadata, kept aligned with the keys through compaction.
        self.timestep = torch.zeros(L, E, C, dtype=torch.long, device=device)
        self.kind = torch.zeros(L, E, C, dtype=torch.long, device=device)
        self.arrival = torch.zeros(L, E, C, dtype=torch.long, device=device)  # index in episode
        self.n_arrived = torch.zeros(E, dtype=torch.long, device=device)  # tokens seen per slot

    @property
    def n_layers(self):
        return self.keys.shape[0]

    @property
    def n_slots(self):
        return self.keys.shape[1]

    def reset(self, slots):
        """Empty the given slots (a bool mask [E] or index tensor) for new episodes."""
        self.valid[:, slots] = False
        self.length[:, slots] = 0
        self.n_arrived[slots] = 0

    def evict(self, mask):
        """Forget the tokens where mask [L, E, C] is True."""
        self.valid &= ~mask

    def held(self):
        """Tokens held per layer and slot, [L, E]."""
        return self.valid.sum(-1)

    def span(self, layer):
        """Positions [0, span) hold every written token of this layer in all slots."""
        return int(self.length[layer].max())

    def append(self, new_valid, timestep, kind):
        """Reserve positions for new tokens and record their metadata.

        new_valid [E, n] says which new tokens exist (a slot's first step has no previous
        action; an idle slot has none). timestep, kind: [E, n]. Returns the positions
        pos [L, E, n]; a missing token gets its predecessor's position and is not written.
        """
        n_new = new_valid.sum(-1)  # [E]
        full = self.length + n_new > self.capacity  # [L, E]
        if full.any():
            self._compact(full)
            if (self.length + n_new > self.capacity).any():
                raise RuntimeError(
                    f"KV cache capacity {self.capacity} exhausted: the memory policy keeps "
                    "more tokens than the cache was sized for")
        offset = new_valid.long().cumsum(-1) - 1  # [E, n]
        pos = self.length[:, :, None] + offset[None]  # [L, E, n]
        L, E, n = pos.shape
        layer = torch.arange(L, device=pos.device)[:, None, None].expand(L, E, n)[:, new_valid]
        slot = torch.arange(E, device=pos.device)[None, :, None].expand(L, E, n)[:, new_valid]
        at = pos[:, new_valid]
        self.valid[layer, slot, at] = True
        self.timestep[layer, slot, at] = timestep[new_valid].expand_as(at)
        self.kind[layer, slot, at] = kind[new_valid].expand_as(at)
        arrival = self.n_arrived[:, None] + offset
        self.arrival[layer, slot, at] = arrival[new_valid].expand_as(at)
        self.length += n_new
        self.n_arrived += n_new
        self._write_index = (slot, at, new_valid)  # [L, M] each, M new tokens
        return pos

    def write(self, layer, k, v):
        """Store the new tokens' keys and values [E, H, n, D] of one layer at the positions
        reserved by the last append."""
        slots, at, new_valid = self._write_index
        self.keys[layer, slots[layer], :, at[layer]] = k.transpose(1, 2)[new_valid]
        self.values[layer, slots[layer], :, at[layer]] = v.transpose(1, 2)[new_valid]

    def _compact(self, which):
        """Gather the valid tokens of the (layer, slot) pairs in which [L, E] to the front."""
        layer, slot = which.nonzero(as_tuple=True)
        order = torch.argsort((~self.valid[layer, slot]).to(torch.int8), dim=-1, stable=True)
        H, D = self.keys.shape[2], self.keys.shape[4]
        kv_order = order[:, None, :, None].expand(-1, H, -1, D)
        self.keys[layer, slot] = self.keys[layer, slot].gather(2, kv_order)
        self.values[layer, slot] = self.values[layer, slot].gather(2, kv_order)
        for name in ("valid", "timestep", "kind", "arrival"):
            table = getattr(self, name)
            table[layer, slot] = table[layer, slot].gather(1, order)
        self.length[layer, slot] = self.valid[layer, slot].sum(-1)
