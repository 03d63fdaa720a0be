"""The Decision Transformer (Chen et al. 2021): training forward and KV-cached decode.

Each timestep t contributes three tokens, return-to-go R_t, state s_t, action a_t, in that
order; the action is predicted from the state token. As in the reference model there is
no positional embedding: a learned timestep embedding is added to all three tokens.
"""

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from dtmem.cache import ACTION, RETURN, STATE, KVCache


@dataclass
class DTConfig:
    state_dim: int
    act_dim: int
    context_steps: int = 20  # K: timesteps in the training window
    n_layer: int = 3
    n_head: int = 1
    n_embd: int = 128
    dropout: float = 0.1
    max_timestep: int = 1000  # entries of the timestep embedding

    def to_dict(self):
        return asdict(self)


class Block(nn.Module):
    """GPT-2 block (pre-LayerNorm) with ReLU, as the reference DT configures it."""

    def __init__(self, cfg: DTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.ReLU(),
            nn.Linear(4 * cfg.n_embd, cfg.n_embd), nn.Dropout(cfg.dropout))
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def heads(self, x):
        """[B, T, C] -> q, k, v each [B, H, T, C/H]."""
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(C, dim=-1)
        return [t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v)]

    def finish(self, x, y):
        """Merge heads of the attention output y [B, H, T, D], then residual and MLP."""
        B, T, C = x.shape
        x = x + self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))
        return x + self.mlp(self.ln_2(x))

    def forward(self, x):
        q, k, v = self.heads(x)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.finish(x, y)

    def decode(self, x, cache: KVCache, layer, pos, reading, last_query_only=False):
        """x [E, n, C]: new tokens at cache positions pos [E, n]; attends to the valid
        cached tokens of this layer and, causally, to the new ones, reading the positions
        that `reading` = (span, split, long) of ragged_splits names. Returns the new
        tokens' outputs and their attention probabilities. last_query_only: the
        caller needs only the last token's output (all keys and values are still written,
        and attention is still computed for every query, so that memory policies see it
        and results do not depend on whether they asked)."""
        q, k, v = self.heads(x)
        cache.write(layer, k, v)
        span, split, long = reading
        scores = attention_scores(q, cache.layer_keys(layer, split))  # [E, H, n, split]
        if long is not None:
            head, scores = scores, q.new_empty(q.shape[:3] + (span,))  # [E, H, n, S]
            scores[..., :split] = head
            tail_keys = cache.layer_keys(layer, span, split, long)
            scores[long, ..., split:] = attention_scores(q[long], tail_keys)
        scores /= math.sqrt(q.shape[-1])
        seen = torch.arange(span, device=x.device)[None, None, :] <= pos[:, :, None]
        # Positions past a slot's length are invalid, so this also hides what the split
        # left unwritten. A finite fill keeps rows without any key (idle slots) NaN-free.
        allowed = cache.valid[layer, :, None, :span] & seen  # [E, n, S]
        scores.masked_fill_(~allowed[:, None], torch.finfo(scores.dtype).min)
        probs = scores.softmax(-1)
        rows = probs[:, :, -1:] if last_query_only else probs
        y = attention_output(rows[..., :split], cache.layer_values(layer, split))  # [E, H, n, D]
        if long is not None:
            tail_values = cache.layer_values(layer, span, split, long)
            y.index_add_(0, long, attention_output(rows[long, ..., split:], tail_values))
        return self.finish(x[:, -1:] if last_query_only else x, y), probs


# A decode step has 1 to 3 queries per slot, shapes for which MKL's batched matmul picks
# slow kernels; both products below are written the way it runs fastest on CPU (measured
# at 256 slots x 400 positions, ad-hoc microbenchmarks).
def attention_scores(q, keys):
    """q [E, H, n, D], keys [E, H, S, D] -> [E, H, n, S], as (keys @ q^T)^T: the
    tall-skinny product takes 8.5 ms where q @ keys^T takes 20 ms."""
    return (keys @ q.transpose(-1, -2)).transpose(-1, -2)


def attention_output(rows, values):
    """rows [E, H, n, S] of attention, values [E, H, S, D] -> [E, H, n, D], with the rows
    padded by zero rows to a multiple of 4: 11.4 ms with 4 rows where 3 take 17.0 ms."""
    n = rows.shape[-2]
    return (F.pad(rows, (0, 0, 0, -n % 4)) @ values)[..., :n, :]


def ragged_splits(lengths, copy_cost=2):
    """How to read the cache positions of each layer so that attention reads little
    padding: slots hold lengths [L, E] tokens, and a few long ones (a policy that keeps
    much) would make every slot read up to the longest. Positions [0, split) are read for
    all slots (a view); past split, only the `long` slots' are (a gathered copy, costlier
    per token by copy_cost). Returns per layer (span, split, long slot indices or None
    when not worth it), where positions [0, span) hold every slot's tokens."""
    ordered = lengths.sort(dim=-1, descending=True).values  # [L, E]
    n_long = torch.arange(ordered.shape[1], device=lengths.device)
    cost = ordered.shape[1] * ordered + copy_cost * n_long * (ordered[:, :1] - ordered)
    best = cost.argmin(-1)  # [L]; the first of equal costs, as for one layer alone
    splits = ordered.gather(1, best[:, None])  # [L, 1]
    readings = []
    for span, split, first, row in zip(ordered[:, 0].tolist(), splits[:, 0].tolist(),
                                       best.tolist(), lengths):
        long = None if first == 0 else (row > split).nonzero().squeeze(1)
        readings.append((span, split, long))
    return readings


class DecisionTransformer(nn.Module):
    def __init__(self, cfg: DTConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_timestep = nn.Embedding(cfg.max_timestep, cfg.n_embd)
        self.embed_return = nn.Linear(1, cfg.n_embd)
        self.embed_state = nn.Linear(cfg.state_dim, cfg.n_embd)
        self.embed_action = nn.Linear(cfg.act_dim, cfg.n_embd)
        self.embed_ln = nn.LayerNorm(cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.predict_action = nn.Sequential(nn.Linear(cfg.n_embd, cfg.act_dim), nn.Tanh())

    def embed(self, rtg, states, actions, timesteps):
        """rtg [B, T, 1], states [B, T, S], actions [B, T, A], timesteps [B, T]
        -> tokens [B, T, 3, C] ordered (return, state, action) within each step."""
        time = self.embed_timestep(timesteps.clamp(0, self.cfg.max_timestep - 1))
        return torch.stack([self.embed_return(rtg) + time, self.embed_state(states) + time,
                            self.embed_action(actions) + time], dim=2)

    def forward(self, rtg, states, actions, timesteps):
        """Causal forward over whole windows; returns the action predicted at every
        state token, [B, T, A]. Windows are right-padded, so causal attention alone keeps
        real tokens from seeing padding."""
        B, T, _ = states.shape
        x = self.embed(rtg, states, actions, timesteps).reshape(B, 3 * T, -1)
        x = self.drop(self.embed_ln(x))
        for block in self.blocks:
            x = block(x)
        return self.predict_action(self.ln_f(x[:, STATE::3]))

    def new_cache(self, n_slots, capacity, device=None):
        cfg = self.cfg
        device = device or next(self.parameters()).device
        return KVCache(cfg.n_layer, n_slots, cfg.n_head, cfg.n_embd // cfg.n_head, capacity,
                       device=device, dtype=next(self.parameters()).dtype)

    @torch.no_grad()
    def decode(self, cache: KVCache, prev_action, rtg, state, timestep, active,
               want_attention=False):
        """One env step for E slots: append (a_{t-1}, R_t, s_t) and predict a_t.

        prev_action [E, A], rtg [E, 1], state [E, S], timestep [E] (t), active [E] bool.
        A slot at t = 0 has no previous action; an inactive slot appends nothing.
        Returns actions [E, A], and per layer the attention probabilities of the new
        queries over the cache positions [E, H, 3, span] (or None).
        """
        E = state.shape[0]
        step = torch.stack([timestep - 1, timestep, timestep], dim=1)  # [E, 3]
        kind = torch.tensor([ACTION, RETURN, STATE], device=state.device).expand(E, 3)
        new_valid = active[:, None] & torch.stack(
            [timestep > 0, torch.ones_like(active), torch.ones_like(active)], dim=1)
        time = self.embed_timestep(step.clamp(0, self.cfg.max_timestep - 1))  # [E, 3, C]
        x = torch.stack([self.embed_action(prev_action), self.embed_return(rtg),
                         self.embed_state(state)], dim=1) + time
        x = self.embed_ln(x)
        pos = cache.append(new_valid, step, kind)
        attention = []
        readings = ragged_splits(cache.length)
        for layer, block in enumerate(self.blocks):
            # In the last layer only the state token's output matters: it predicts the action.
            last = layer == len(self.blocks) - 1
            x, probs = block.decode(x, cache, layer, pos[layer], readings[layer], last)
            if want_attention:  # rows of missing tokens are meaningless: zero them
                probs.mul_(new_valid[:, None, :, None])
            attention.append(probs)
        actions = self.predict_action(self.ln_f(x[:, -1]))
        return actions, (attention if want_attention else None)
