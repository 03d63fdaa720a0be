"""NAMM as a memory policy on the DT's KV cache (features and scorers: dtmem/namm.py).

Every query's attention row is buffered per cached token; once a slot has n_up new
queries, its tokens get new features and scores, and tokens scoring below 0 are evicted
(the newest always stays; --budget adds a hard cap, top-k before the threshold).
Deviations from the LLM setting, each forced by the DT:
  - A DT step makes 3 tokens, so an update runs at the first step boundary with at least
    n_up buffered queries and consumes exactly n_up of them; the rest wait for the next.
  - dtmem's cache keeps one validity per layer, not per head: with several heads a token
    is scored by its best head (with the DT's single head this is the published rule).
Slots may carry different parameter vectors (one per population member in evolution).
"""

import torch

from dtmem import namm
from dtmem.errors import UserError
from dtmem.memory import SLACK_TOKENS, MemoryPolicy, register

# 32 DT steps. Measured: 10 generations of evolution on hopper-medium (same seed) with
# n_up = 16, 48, 96 and 192; 96 had the best population mean and CMA-ES mean evaluation
# at a similar cache size and cost (results/n-up-sweep/). Shorter periods update on one
# or two STFT frames of attention; 192 lets the cache grow by 64 steps between updates,
# far beyond the DT's 20-step training context.
DEFAULT_N_UP = 96


@register
class NAMM(MemoryPolicy):
    name = "namm"
    scorer = "bam"
    needs_attention = True
    takes_budget = True

    def __init__(self, context_steps, max_tokens, budget=None, ratio=None, n_up=DEFAULT_N_UP,
                 namm_file=None):
        """namm_file: parameters, frozen statistics and n_up from a NAMM file; without
        one the parameters are zero (keep everything) and statistics are collected."""
        super().__init__(context_steps, max_tokens)
        if ratio is not None:
            raise UserError(f"policy {self.name!r} takes a --budget (hard cap), not --ratio")
        if n_up <= 0 or n_up % namm.HOP:
            raise UserError(f"n_up must be a positive multiple of {namm.HOP}, got {n_up}")
        self.cap, self.n_up = budget, n_up
        self.score_fn, self.n_params = namm.SCORERS[self.scorer]
        self.params = torch.zeros(self.n_params)  # [P] or [E, P]; zeros keep everything
        # Per-bin standardisation statistics (mean, var, count); collected while
        # collect_stats is True (the first evaluation, zero parameters), then frozen.
        self.stats = (torch.zeros(namm.N_BINS), torch.ones(namm.N_BINS), 0)
        self.collect_stats = True
        if namm_file is not None:
            self.params, self.stats, self.n_up, self.meta = namm.load_namm(namm_file,
                                                                           self.scorer)
            self.collect_stats = False

    def capacity(self):
        if self.cap is None:
            return self.max_tokens
        # Between updates up to n_up + 2 tokens arrive on top of the cap.
        return min(self.max_tokens, self.cap + self.n_up + 2 + SLACK_TOKENS)

    def prepare(self, cache):
        H = cache.keys.shape[3]
        cache.add_token_state("namm_rows", H, self.n_up + 2)  # pending attention
        cache.add_token_state("namm_tail", H, namm.HOP)  # carried-over samples
        cache.add_token_state("namm_ema", H, namm.N_BINS)
        E = cache.n_slots
        self.pending = torch.zeros(E, dtype=torch.long, device=cache.valid.device)
        self.period_start = torch.zeros_like(self.pending)  # arrival index of its 1st query

    def reset(self, slots):
        self.pending[slots] = 0
        self.period_start[slots] = 0

    def after_step(self, cache, timestep, attention):
        # A valid query's row sums to 1; rows of missing tokens were zeroed by the model.
        valid_query = attention[0][:, 0].sum(-1) > 0.5  # [E, n_new]
        row = self.pending[:, None] + valid_query.long().cumsum(-1) - 1
        slot, query = valid_query.nonzero(as_tuple=True)  # [M] each
        pending_rows = cache.token_state["namm_rows"]
        for layer, probs in enumerate(attention):  # [E, H, n_new, span]
            span = probs.shape[-1]
            pending_rows[layer, slot, :span, :, row[slot, query]] = (
                probs[slot, :, query].transpose(1, 2))  # [M, span, H]
        self.pending += valid_query.sum(-1)
        due = (self.pending >= self.n_up).nonzero().squeeze(1)
        if len(due):
            self._update(cache, due)

    def _update(self, cache, due):
        L, H, n_up = cache.n_layers, cache.keys.shape[3], self.n_up
        pending_rows, tails, emas = (cache.token_state[f"namm_{name}"]
                                     for name in ("rows", "tail", "ema"))
        # Gather the surviving tokens to the front first: the scorer's cost grows with the
        # square of the span, and evicted positions would only be masked out.
        which = torch.zeros_like(cache.valid[..., 0])
        which[:, due] = True
        cache.compact(which)
        span = int(cache.length[:, due].max())
        rows = pending_rows[:, due, :span]  # [L, U, S, H, R]
        signal = torch.cat([tails[:, due, :span], rows[..., :n_up]], dim=-1)
        frames = namm.spectrogram(signal.reshape(-1, namm.HOP + n_up))
        arrival = cache.arrival[:, due, :span]  # [L, U, S]
        # A token that arrived in this period has no attention before its own query.
        offset = (arrival - self.period_start[due][None, :, None]).clamp(min=0)
        first_frame = (offset // namm.HOP)[..., None].expand(-1, -1, -1, H).reshape(-1)
        ema = namm.ema_update(emas[:, due, :span].reshape(-1, namm.N_BINS), frames,
                              first_frame).reshape(L, len(due), span, H, namm.N_BINS)
        emas[:, due, :span] = ema
        tails[:, due, :span] = signal[..., -namm.HOP:]
        leftover = rows[..., n_up:].clone()
        pending_rows[:, due, :span] = 0
        pending_rows[:, due, :span, :, : leftover.shape[-1]] = leftover
        self.pending[due] -= n_up
        self.period_start[due] += n_up

        valid = cache.valid[:, due, :span]  # [L, U, S]
        if self.collect_stats:
            values = ema[valid]  # [tokens, H, 17]: pooled over layers, slots, heads, calls
            values = values.reshape(-1, namm.N_BINS)
            batch = (values.mean(0), values.var(0, unbiased=False), len(values))
            self.stats = namm.merge_stats(self.stats, batch)
        age = (cache.n_arrived[due] - 1)[None, :, None] - arrival
        features = torch.cat([
            namm.recency(age)[..., None, :].expand(-1, -1, -1, H, -1),
            namm.standardise(ema, self.stats)], dim=-1)  # [L, U, S, H, 25]
        features = features.permute(0, 1, 3, 2, 4).reshape(-1, span, namm.N_FEATURES)
        # Backward mask: a token looks at itself and the newer tokens it competes with.
        allowed = valid[..., None, :] & (arrival[..., None, :] >= arrival[..., :, None])
        allowed |= torch.eye(span, dtype=torch.bool, device=allowed.device)
        allowed = allowed[:, :, None].expand(-1, -1, H, -1, -1).reshape(-1, span, span)
        params = self.params.to(features.device)
        params = (params[due] if params.dim() == 2 else params.expand(len(due), -1))
        params = params[None, :, None].expand(L, -1, H, -1).reshape(-1, self.n_params)
        scores = self.score_fn(params, features, allowed).reshape(L, len(due), H, span)
        scores = scores.amax(2).masked_fill(~valid, float("-inf"))  # [L, U, S]
        newest = arrival == (cache.n_arrived[due] - 1)[None, :, None]
        keep = (scores >= 0) | newest
        if self.cap is not None:
            rank = scores.masked_fill(newest, float("inf")).argsort(
                dim=-1, descending=True).argsort(dim=-1)
            keep &= rank < self.cap
        evict = torch.zeros_like(cache.valid)
        evict[:, due, :span] = valid & ~keep
        cache.evict(evict)


@register
class NAMMMLP(NAMM):
    """The MLP ablation: the same features, each token scored alone."""

    name = "namm-mlp"
    scorer = "mlp"
