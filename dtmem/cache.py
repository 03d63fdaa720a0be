"""The KV cache: keys and values of every layer for E episode slots, allocated in bulk.

Appending writes in place at each (layer, slot)'s write pointer; evicting only clears
`valid`. When a (layer, slot) runs out of room the cache first grows (doubling, up to
`capacity`; positions stay put), and only at full capacity compacts (valid tokens
gathered to the front, order kept). Growing keeps short episodes and policies that keep
few tokens from paying for a whole-episode cache they never fill. Layers keep their own
validity because memory policies such as NAMM evict per layer, so each layer also has its
own write pointer and metadata.

Keys and values are stored [L, E, C, H, D] (position before head) so that the new tokens
of a step are written with one index_copy_ into a flat [E * C, H, D] view.
"""

import torch

# Token kinds, in the order a Decision Transformer interleaves them within one timestep.
RETURN, STATE, ACTION = 0, 1, 2
INITIAL_TOKENS = 384  # positions allocated per slot before the cache first grows


class KVCache:
    def __init__(self, n_layers, n_slots, n_heads, head_dim, capacity, device="cpu",
                 dtype=torch.float32):
        L, E, H, C, D = n_layers, n_slots, n_heads, min(capacity, INITIAL_TOKENS), head_dim
        self.capacity = capacity  # the most positions per slot it may grow to
        self.keys = torch.zeros(L, E, C, H, D, device=device, dtype=dtype)
        self.values = torch.zeros(L, E, C, H, D, device=device, dtype=dtype)
        self.valid = torch.zeros(L, E, C, dtype=torch.bool, device=device)
        self.length = torch.zeros(L, E, dtype=torch.long, device=device)  # write pointer
        # Per-token metadata, kept aligned with the keys through compaction.
        self.timestep = torch.zeros(L, E, C, dtype=torch.long, device=device)
        self.kind = torch.zeros(L, E, C, dtype=torch.long, device=device)
        self.arrival = torch.zeros(L, E, C, dtype=torch.long, device=device)  # index in episode
        self.n_arrived = torch.zeros(E, dtype=torch.long, device=device)  # tokens seen per slot
        # Per-token state of memory policies (accumulated attention, ...): [L, E, C] tables
        # that compaction moves along and that start at zero for every new token.
        self.token_state = {}

    def add_token_state(self, name, *shape, dtype=torch.float32):
        """A zero-initialised [L, E, C, *shape] table that follows its tokens. Growing
        replaces it: look it up in `token_state` each time rather than keeping it."""
        L, E, C = self.valid.shape
        self.token_state[name] = torch.zeros(L, E, C, *shape, dtype=dtype,
                                             device=self.valid.device)
        return self.token_state[name]

    @property
    def n_layers(self):
        return self.keys.shape[0]

    @property
    def n_slots(self):
        return self.keys.shape[1]

    @property
    def allocated(self):
        """Positions per slot allocated now (at most `capacity`)."""
        return self.valid.shape[2]

    def reset(self, slots):
        """Empty the given slots (a bool mask [E] or index tensor) for new episodes."""
        self.valid[:, slots] = False
        self.length[:, slots] = 0
        self.n_arrived[slots] = 0

    def keep_slots(self, slots):
        """Keep only the given slots (an ascending index tensor), renumbered 0.. in that
        order: the batch shrinks once episodes end and no new ones wait, so finished slots
        stop costing compute. Each kept (layer, slot) moves down within the tables' own
        memory (new memory would cost fresh pages, several times the copy), and only its
        first n positions, n the longest kept slot's length: past it no position holds a
        token, and what stays there is finite and marked invalid."""
        kept = slots.tolist()
        if kept != sorted(set(kept)):
            raise ValueError(f"keep_slots needs ascending slot indices, got {kept}")
        L, E, C = self.valid.shape
        n = int(self.length[:, slots].max())
        # Row l * E + s becomes row l * len(kept) + j: never a later row, and a row is read
        # before any earlier one is written over it, so moving them in order is safe.
        moves = [(l * len(kept) + j, l * E + s) for l in range(L) for j, s in enumerate(kept)
                 if l * len(kept) + j != l * E + s]

        def moved(table):
            rows = table.view(L * E, C, *table.shape[3:])
            for target, source in moves:
                rows[target, :n] = rows[source, :n]
            return rows[: L * len(kept)].view(L, len(kept), C, *table.shape[3:])

        self._replace_tables(moved)
        self.valid[:, :, n:] = False
        self.length, self.n_arrived = self.length[:, slots], self.n_arrived[slots]

    def evict(self, mask):
        """Forget the tokens where mask [L, E, C] is True."""
        self.valid &= ~mask

    def held(self):
        """Tokens held per layer and slot, [L, E]."""
        return self.valid.sum(-1)

    def max_arrival_bonus(self):
        """A score bonus larger than any arrival index or attention total, so that a
        policy can rank a class of tokens (sinks, recent ones) above all others."""
        return float(self.capacity + int(self.n_arrived.max()) + 1)

    def layer_keys(self, layer, stop, start=0, slots=None):
        """Keys of positions [start, stop) of one layer as [E, H, stop - start, D]: a view,
        or a copy holding only the given slots (an index tensor)."""
        return _positions(self.keys[layer], start, stop, slots)

    def layer_values(self, layer, stop, start=0, slots=None):
        return _positions(self.values[layer], start, stop, slots)

    def append(self, new_valid, timestep, kind):
        """Reserve positions for new tokens and record their metadata.

        new_valid [E, n] says which new tokens exist (a slot's first step has no previous
        action; an idle slot has none). timestep, kind: [E, n]. Returns the positions
        pos [L, E, n]; a missing token gets its predecessor's position and is not written.
        """
        n_new = new_valid.sum(-1)  # [E]
        needed = int((self.length + n_new).max())
        if needed > self.allocated and self.allocated < self.capacity:
            self._grow(needed)
        if needed > self.allocated:
            self.compact(self.length + n_new > self.allocated)
            if (self.length + n_new > self.allocated).any():
                raise RuntimeError(
                    f"KV cache capacity {self.capacity} exhausted: the memory policy keeps "
                    "more tokens than the cache was sized for")
        offset = new_valid.long().cumsum(-1) - 1  # [E, n]
        pos = self.length[:, :, None] + offset[None]  # [L, E, n]
        L, E, C = self.valid.shape
        new_rows = new_valid.flatten().nonzero().squeeze(1)  # [M]: (slot, token) of new ones
        slot = new_rows // new_valid.shape[1]
        # Flat index of each new token in a [E * C] view of one layer: [L, M].
        in_layer = slot * C + pos.flatten(1).index_select(1, new_rows)
        flat = (in_layer + torch.arange(L, device=pos.device)[:, None] * (E * C)).reshape(-1)
        arrival = self.n_arrived[:, None] + offset
        self.valid.view(-1).index_fill_(0, flat, True)
        for table, value in ((self.timestep, timestep), (self.kind, kind),
                             (self.arrival, arrival)):
            table.view(-1).index_copy_(0, flat, value.flatten().index_select(0, new_rows).repeat(L))
        for table in self.token_state.values():
            table.view(L * E * C, -1).index_fill_(0, flat, 0)
        self.length += n_new
        self.n_arrived += n_new
        self._write_index = (in_layer, new_rows)
        return pos

    def _grow(self, needed):
        """Reallocate every [L, E, C, ...] table with room for at least `needed` positions."""
        C = self.allocated
        size = min(self.capacity, max(needed, 2 * C))

        def grown(table):  # written once: fresh pages are the main cost of growing
            bigger = table.new_empty(table.shape[:2] + (size,) + table.shape[3:])
            bigger[:, :, :C] = table
            bigger[:, :, C:] = 0
            return bigger

        self._replace_tables(grown)

    def _replace_tables(self, change):
        """Replace every [L, E, C, ...] table (token state included) by change(table)."""
        self.keys, self.values, self.valid, self.timestep, self.kind, self.arrival = map(
            change, (self.keys, self.values, self.valid, self.timestep, self.kind, self.arrival))
        self.token_state = {name: change(table) for name, table in self.token_state.items()}

    def write(self, layer, k, v):
        """Store the new tokens' keys and values [E, H, n, D] of one layer at the positions
        reserved by the last append."""
        in_layer, new_rows = self._write_index
        E, C = self.valid.shape[1:]
        for store, new in ((self.keys, k), (self.values, v)):
            new = new.transpose(1, 2).flatten(0, 1).index_select(0, new_rows)  # [M, H, D]
            store[layer].view(E * C, *store.shape[3:]).index_copy_(0, in_layer[layer], new)

    def compact(self, which):
        """Gather the valid tokens of the (layer, slot) pairs in which [L, E] to the front,
        in order. Only they move: what lies past the new length is invalid and never read
        as a token (stale copies may remain there)."""
        L, E, C = self.valid.shape
        layer, slot = which.nonzero(as_tuple=True)
        if len(layer) == 0:
            return
        span = int(self.length[layer, slot].max())  # nothing was written beyond it
        valid = self.valid[layer, slot, :span]  # [P, span]
        kept = valid.sum(-1)
        order = torch.argsort((~valid).to(torch.int8), dim=-1, stable=True)
        moving = torch.arange(span, device=kept.device) < kept[:, None]  # [P, span]
        # Whole (H, D) rows move at once through a flat [L * E * C] view: index_select
        # copies contiguous rows, far faster than an elementwise gather.
        base = ((layer * E + slot) * C)[:, None]
        positions = base + torch.arange(span, device=base.device)
        source, target = (base + order)[moving], positions[moving]
        for table in (self.keys, self.values, *self.token_state.values(), self.timestep,
                      self.kind, self.arrival):
            rows = table.view(L * E * C, -1)
            rows.index_copy_(0, target, rows.index_select(0, source))
        self.valid.view(-1)[positions.reshape(-1)] = moving.reshape(-1)
        self.length[layer, slot] = kept


def _positions(table, start, stop, slots):
    """[E, C, H, D] -> [E or len(slots), H, stop - start, D]; index_select copies each
    slot's positions as one contiguous block."""
    table = table[:, start:stop]
    if slots is not None:
        table = table.index_select(0, slots)
    return table.permute(0, 2, 1, 3)
