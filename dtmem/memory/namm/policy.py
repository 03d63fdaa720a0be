"""NAMM as a memory policy on the DT's KV cache (features.py and scorers.py hold the math).

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

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from dtmem.errors import UserError
from dtmem.files import relative_to_root, sha256
from dtmem.memory import SLACK_TOKENS, MemoryPolicy, check_budget, keep_top, register
from dtmem.memory.namm.features import (
    HOP,
    N_BINS,
    N_FEATURES,
    ema_update,
    merge_stats,
    recency,
    spectrogram,
    standardise,
)
from dtmem.memory.namm.io import load_namm, read_namm, shipped_file
from dtmem.memory.namm.scorers import SCORERS

# 32 DT steps. Measured: 10 generations of evolution on hopper-medium (same seed) with
# n_up = 16, 48, 96 and 192; 96 had the best population mean and CMA-ES mean evaluation
# at a similar cache size and cost (results/n-up-sweep/). Shorter periods update on one
# or two STFT frames of attention; 192 lets the cache grow by 64 steps between updates,
# far beyond the DT's 20-step training context.
DEFAULT_N_UP = 96
# Tokens per block of an update's spectrograms and EMAs. Rows are independent, so blocks
# change no number; they keep the temporaries (the STFT's frames and spectrum, about
# 2.4 KB per token and head) to a few MB that the allocator reuses, where all tokens at
# once took hundreds of MB of fresh pages per update (measured: zeroing such pages was 13%
# of an evolution generation, mostly for updates).
TOKENS_PER_BLOCK = 2**14


@register
@dataclass
class NAMM(MemoryPolicy):
    """Neural Attention Memory Model with the BAM scorer (backward attention, 4,172
    parameters): evicts the tokens its network scores below zero."""

    name = "namm"
    scorer: ClassVar[str] = "bam"
    n_params: ClassVar[int] = SCORERS["bam"][1]
    needs_attention = True
    takes_budget = True

    budget: int | None = None
    """hard cap on tokens per layer at each update (top-k before the threshold)"""
    ratio: float | None = None
    """not supported: a NAMM decides its own cache size"""
    namm_file: str | None = None
    """NAMM file (parameters, frozen statistics, n_up); default: the shipped one"""
    n_up: int | None = None
    """tokens between updates, a multiple of 16 (default: the file's; 96 with params)"""
    params: torch.Tensor | None = None
    """[P] or [E, P] parameters given directly (evolution; zeros keep everything)"""
    stats: tuple | None = None
    """with params: frozen statistics (mean, var, count); None: collect them"""
    meta: dict = field(init=False, repr=False, default_factory=dict)
    collect_stats: bool = field(init=False, default=False)

    def __post_init__(self):
        if self.ratio is not None:
            raise UserError(f"policy {self.name!r} takes a --budget (hard cap), not --ratio")
        check_budget(self.budget, None, self.max_tokens)
        self.score_fn = SCORERS[self.scorer][0]
        if self.params is None:
            self.namm_file = self.namm_file or self.shipped_namm()
            self.params, self.stats, n_up, self.meta = load_namm(self.namm_file, self.scorer)
            if self.n_up not in (None, n_up):
                raise UserError(f"{self.namm_file} was evolved with n_up {n_up}; "
                                f"n_up {self.n_up} was asked for")
            self.n_up = n_up
        else:
            self.n_up = self.n_up or DEFAULT_N_UP
            # Per-bin standardisation statistics (mean, var, count): collected while
            # collect_stats is True (the first evaluation, zero parameters), then frozen.
            self.collect_stats = self.stats is None
            if self.collect_stats:
                self.stats = (torch.zeros(N_BINS), torch.ones(N_BINS), 0)
        if self.n_up <= 0 or self.n_up % HOP:
            raise UserError(f"n_up must be a positive multiple of {HOP}, got {self.n_up}")

    def shipped_namm(self):
        """The NAMM file run without --namm: the shipped zero-shot one."""
        return shipped_file("default")

    def describe(self):
        if self.namm_file is None:
            return {"budget": self.budget, "ratio": None, "namm": None}
        return {"budget": self.budget, "ratio": None,
                "namm": relative_to_root(self.namm_file),
                "namm_sha256": sha256(self.namm_file),
                "namm_sources": sorted({t for stage in self.meta.get("stages", [])
                                        for t in stage})}

    def capacity(self):
        return min(self.max_tokens, self.max_held() + SLACK_TOKENS)

    def max_held(self):
        if self.budget is None:
            return self.max_tokens
        # Between updates up to n_up + 2 tokens arrive on top of the cap.
        return min(self.max_tokens, self.budget + self.n_up + 2)

    def prepare(self, cache):
        H = cache.keys.shape[3]
        cache.add_token_state("namm_rows", H, self.n_up + 2)  # pending attention
        cache.add_token_state("namm_tail", H, HOP)  # carried-over samples
        cache.add_token_state("namm_ema", H, N_BINS)
        E = cache.n_slots
        self.pending = torch.zeros(E, dtype=torch.long, device=cache.valid.device)
        self.period_start = torch.zeros_like(self.pending)  # arrival index of its 1st query

    def reset(self, slots):
        self.pending[slots] = 0
        self.period_start[slots] = 0

    def keep_slots(self, slots):
        self.pending, self.period_start = self.pending[slots], self.period_start[slots]
        if self.params.dim() == 2:
            self.params = self.params[slots.to(self.params.device)]

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
        L, U, H, n_up = cache.n_layers, len(due), cache.keys.shape[3], self.n_up
        # Only this method evicts, and it compacts right after: every (layer, slot) holds
        # its tokens at positions [0, length), in arrival order.
        lengths = cache.length[:, due]  # [L, U]
        span = int(lengths.max())
        valid = cache.valid[:, due, :span]  # [L, U, S]
        layer, member, pos = valid.nonzero(as_tuple=True)  # one entry per token: [N] each
        slot = due[member]
        arrival = cache.arrival[layer, slot, pos]  # [N]
        # A token that arrived in this period has no attention before its own query.
        offset = (arrival - self.period_start[slot]).clamp(min=0)
        # Tokens that arrived after this update's n_up queries (a DT step's 3 tokens do not
        # align with n_up: with n_up = 96, R_t and s_t wait for the next update) have received
        # no attention yet. The original never scores such a token (in the LLM every token of
        # an update arrives within its queries), so they are kept unscored, as the newest
        # token is, and left out of the scorer's input and the normalisation statistics.
        # They are the newest tokens, so each group's scored tokens stay a prefix.
        unseen = offset >= n_up  # [N]
        scored_lengths = lengths - (cache.n_arrived[due] - self.period_start[due]
                                    - n_up).clamp(min=0)  # [L, U]
        blocks = [slice(start, start + TOKENS_PER_BLOCK)
                  for start in range(0, len(pos), TOKENS_PER_BLOCK)]
        ema = torch.cat([self._fold_period(cache, layer[block], slot[block], pos[block],
                                           offset[block] // HOP) for block in blocks])
        self.pending[due] -= n_up
        self.period_start[due] += n_up

        if self.collect_stats:  # pooled over layers, slots, heads and calls
            values = ema[~unseen].reshape(-1, N_BINS)
            if len(values):
                batch = (values.mean(0), values.var(0, unbiased=False), len(values))
                self.stats = merge_stats(self.stats, batch)
        age = cache.n_arrived[slot] - 1 - arrival
        features = torch.cat([recency(age)[:, None].expand(-1, H, -1),
                              standardise(ema, self.stats)], dim=-1)  # [N, H, 25]
        padded = features.new_zeros(L, U, H, span, N_FEATURES)
        padded[layer, member, :, pos] = features
        params = self.params.to(features.device)
        params = (params[due] if params.dim() == 2 else params.expand(U, -1))
        params = params[None, :, None].expand(L, -1, H, -1).reshape(-1, self.n_params)
        scores = self.score_fn(params, padded.reshape(-1, span, N_FEATURES),
                               scored_lengths[..., None].expand(-1, -1, H).reshape(-1))
        scores = scores.reshape(L, U, H, span).amax(2).masked_fill(~valid, float("-inf"))
        protected = valid & (cache.arrival[:, due, :span]
                             == (cache.n_arrived[due] - 1)[None, :, None])  # the newest
        protected[layer[unseen], member[unseen], pos[unseen]] = True
        keep = (scores >= 0) | protected
        if self.budget is not None:
            keep &= keep_top(scores, self.budget, protected)
        evict = torch.zeros_like(cache.valid)
        evict[:, due, :span] = valid & ~keep
        cache.evict(evict)
        # Survivors to the front: the cache's span (what every decode step reads) and the
        # next update's cost shrink with it.
        cache.compact(evict.any(-1))

    def _fold_period(self, cache, layer, slot, pos, first_frame):
        """Fold the period's n_up attention samples of the given tokens [n] into their EMA
        state (a token counts only the frames from first_frame [n] on, its arrival), carry
        their last HOP samples and the queries past n_up over to the next period, and
        return the new EMA [n, H, 17]."""
        pending_rows, tails, emas = (cache.token_state[f"namm_{name}"]
                                     for name in ("rows", "tail", "ema"))
        n_up, H = self.n_up, pending_rows.shape[3]
        rows = pending_rows[layer, slot, pos]  # [n, H, n_up + 2]
        signal = torch.cat([tails[layer, slot, pos], rows[..., :n_up]], dim=-1)
        frames = spectrogram(signal.reshape(-1, HOP + n_up))  # [n * H, Fr, 17]
        ema = ema_update(emas[layer, slot, pos].reshape(-1, N_BINS), frames,
                         first_frame.repeat_interleave(H)).reshape(-1, H, N_BINS)
        emas[layer, slot, pos] = ema
        tails[layer, slot, pos] = signal[..., -HOP:]
        # Queries past n_up wait for the next update. Only they move: the next period's
        # queries rewrite every other column of the buffer before it is read again.
        pending_rows[layer, slot, pos, :, : rows.shape[-1] - n_up] = rows[..., n_up:]
        return ema


@register
@dataclass
class NAMMMLP(NAMM):
    """The MLP ablation as the original builds it: the same features, each token scored
    alone by a linear read-out (26 parameters)."""

    name = "namm-mlp"
    scorer = "mlp"
    n_params = SCORERS["mlp"][1]

    def shipped_namm(self):
        return shipped_file("default-mlp")


@register
@dataclass
class LocalNAMM(NAMM):
    """The NAMM evolved on the task it runs on (data/namm/<task>.pt): the table's
    namm-local row."""

    name = "namm-local"

    def shipped_namm(self):
        path = shipped_file(self.task)
        if not self.task or not path.exists():
            raise UserError(f"no NAMM evolved on {self.task or 'this task'} ships "
                            f"({path.name}); run --policy namm (zero-shot) or evolve one "
                            "with scripts/evolve.py and pass --namm")
        return path


def policy_for_scorer(scorer):
    """The memory policy that runs a scorer: namm (BAM) or namm-mlp."""
    return next(cls.name for cls in (NAMM, NAMMMLP) if cls.scorer == scorer)


def policy_for_file(path):
    return policy_for_scorer(read_namm(path)["scorer"])
