from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dtmem.errors import UserError
from dtmem.memory import ScoredPolicy, register


@register
@dataclass
class SnapKV(ScoredPolicy):
    """SnapKV (Li et al. 2024, "SnapKV: LLM Knows What You Are Looking For Before
    Generation"): the queries of an observation window (the last `window` tokens) vote for
    older tokens with the attention they give them (summed over the window's queries,
    averaged over heads, per layer); votes are pooled over neighbouring tokens (1-D, width
    `kernel`), the best older tokens are kept, and the window itself always is.

    Deviations forced by the DT:
      - SnapKV compresses once, at prefill, with the prompt's last queries. A DT has no
        prompt: it decodes one step at a time, so the vote is re-run at every step over a
        rolling buffer of the attention rows of the last `window` queries (per token, so it
        follows compaction). A query's column in the buffer is its arrival index modulo
        `window`, known from the cache, so no per-slot state is needed.
      - SnapKV selects per KV head; dtmem's cache keeps one validity per layer, so a vote
        is the attention averaged over the layer's heads (one head in the shipped DTs).
      - At prefill the prompt's positions are contiguous. Here evicted tokens leave gaps
        until compaction, so votes are pooled over the held tokens in order (a token's
        neighbours are the nearest tokens still held); as in SnapKV only the older tokens'
        votes are pooled (the window's are zero there).
      - SnapKV requires a budget larger than the window; with a smaller one, the newest
        `budget` tokens of the window are kept."""

    name = "snapkv"
    needs_attention = True

    window: int = 24
    """observation window in queries (= tokens), always kept; 24 = 8 DT steps"""
    kernel: int = 5
    """width of the pooling over neighbouring tokens, odd (SnapKV's default 5)"""
    pooling: str = "avgpool"
    """avgpool (SnapKV's default) or maxpool"""

    def __post_init__(self):
        super().__post_init__()
        if self.window < 3:  # a step's 3 queries need 3 distinct buffer columns
            raise UserError(f"snapkv: window must be at least 3 queries, got {self.window}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise UserError(f"snapkv: kernel must be a positive odd number, got {self.kernel}")
        if self.pooling not in ("avgpool", "maxpool"):
            raise UserError(f"snapkv: pooling must be avgpool or maxpool, got {self.pooling!r}")

    def prepare(self, cache):
        # Column j: the attention received from the query whose arrival index is j mod window.
        cache.add_token_state("snapkv_rows", self.window)

    def after_step(self, cache, timestep, attention):
        # A valid query's row sums to 1; rows of missing tokens were zeroed by the model.
        valid_query = attention[0][:, 0].sum(-1) > 0.5  # [E, n_new]
        first = cache.n_arrived - valid_query.sum(-1)  # arrival index of the step's 1st token
        arrival = first[:, None] + valid_query.long().cumsum(-1) - 1
        slot, query = valid_query.nonzero(as_tuple=True)  # [M] each
        column = arrival[slot, query] % self.window
        rows = cache.token_state["snapkv_rows"]
        for layer, probs in enumerate(attention):  # [E, H, n_new, span]
            span = probs.shape[-1]
            # Overwrites the column of the query `window` queries older: it leaves the window.
            rows[layer, :, :span][slot, :, column] = probs.float().mean(dim=1)[slot, query]
        super().after_step(cache, timestep, attention)

    def score(self, cache, timestep, attention):
        recent = cache.arrival >= (cache.n_arrived - self.window)[None, :, None]
        votes = cache.token_state["snapkv_rows"].sum(-1)  # [L, E, C]
        votes = votes.masked_fill(recent | ~cache.valid, 0)
        # Pool over the held tokens in order: gather them to the front, pool, put back.
        order = (~cache.valid).to(torch.int8).argsort(dim=-1, stable=True)
        packed = votes.gather(-1, order).flatten(0, 1)[:, None]  # [L * E, 1, C]
        pool = F.avg_pool1d if self.pooling == "avgpool" else F.max_pool1d
        pooled = pool(packed, self.kernel, stride=1, padding=self.kernel // 2)
        scores = torch.zeros_like(votes).scatter_(-1, order, pooled.reshape(votes.shape))
        # A vote is at most the n_arrived queries so far, below the bonus: the window
        # outranks every older token, and within it the newer tokens come first.
        return torch.where(recent, cache.max_arrival_bonus() + cache.arrival.float(), scores)

    def describe(self):
        return super().describe() | {"window": self.window, "kernel": self.kernel,
                                     "pooling": self.pooling}
