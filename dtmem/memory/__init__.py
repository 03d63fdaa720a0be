"""Memory policies: each decides which KV-cache tokens a Decision Transformer forgets.

A policy is one small file in this package: a subclass of MemoryPolicy registered with
@register. The rollout engine calls `after_step` once per env step, after the new
tokens (a_{t-1}, R_t, s_t) were decoded; the policy marks tokens with `cache.evict`.
It never touches the model. `recompute` (re-running the last K steps from scratch each
step, the field's standard) is not a cache policy; the rollout engine runs it itself.
"""

import importlib
import importlib.util
import pkgutil
from pathlib import Path

import torch

from dtmem.errors import UserError

POLICIES = {}


def register(cls):
    POLICIES[cls.name] = cls
    return cls


class MemoryPolicy:
    name = ""
    needs_attention = False  # True: after_step receives attention probabilities
    takes_budget = False  # True: the policy keeps a fixed token count or a ratio

    def __init__(self, context_steps: int, max_tokens: int, budget=None, ratio=None):
        self.context_steps = context_steps  # K of the DT
        self.max_tokens = max_tokens  # tokens of a whole episode (3 per step)

    def capacity(self) -> int:
        """Cache positions per slot this policy needs (compaction reclaims evicted ones)."""
        return self.max_tokens

    def prepare(self, cache):
        """Called once with the new cache, e.g. to add per-token state."""

    def reset(self, slots):
        """Episodes restart in these slots; forget any per-slot state."""

    def keep_slots(self, slots):
        """The batch shrinks to these slots (an index tensor), renumbered 0.. in that order;
        keep any per-slot state in step (the cache's own tables are already done)."""

    def after_step(self, cache, timestep, attention):
        """cache: KVCache; timestep [E]: the step just decoded; attention: per layer
        [E, H, n_new, span] probabilities of the new queries (rows of missing tokens are
        zero), or None."""


SLACK_TOKENS = 48  # room beyond a fixed budget, so compaction runs every 16 steps


class ScoredPolicy(MemoryPolicy):
    """Keep the `budget` highest-scoring tokens of each layer and slot: a fixed count, or a
    `ratio` of the tokens the episode has produced so far. The newest token always stays
    (as in NAMM). Subclasses define `score`; higher means keep."""

    takes_budget = True

    def __init__(self, context_steps, max_tokens, budget=None, ratio=None):
        super().__init__(context_steps, max_tokens)
        if budget is None and ratio is None:
            budget = 3 * context_steps  # the tokens of the DT's usual K-step window
        self.budget, self.ratio = budget, ratio

    def capacity(self):
        if self.budget is None:
            return self.max_tokens
        return min(self.max_tokens, self.budget + SLACK_TOKENS)

    def score(self, cache, timestep, attention):
        """[L, E, C] float; only valid positions are read."""
        raise NotImplementedError

    def after_step(self, cache, timestep, attention):
        if self.budget is not None:
            keep = torch.full_like(cache.n_arrived, self.budget)
        else:
            keep = torch.ceil(self.ratio * cache.n_arrived).long().clamp(min=1)
        over = cache.held() > keep  # [L, E]
        if not over.any():
            return
        scores = self.score(cache, timestep, attention).float()
        scores = scores.masked_fill(~cache.valid, float("-inf"))
        newest = cache.arrival == (cache.n_arrived - 1)[None, :, None]
        scores = scores.masked_fill(newest & cache.valid, float("inf"))
        rank = scores.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
        cache.evict(cache.valid & over[..., None] & (rank >= keep[None, :, None]))


def policy_names():
    return ["recompute", *POLICIES]


def make_policy(name, context_steps, max_tokens, budget=None, ratio=None,
                **options) -> MemoryPolicy:
    """options: policy-specific settings (NAMM: namm_file, n_up)."""
    if name not in POLICIES:
        raise UserError(f"unknown policy {name!r}; valid policies: {', '.join(policy_names())}")
    cls = POLICIES[name]
    if (budget is not None or ratio is not None) and not cls.takes_budget:
        raise UserError(f"policy {name!r} takes no --budget or --ratio")
    if budget is not None and ratio is not None:
        raise UserError("give either --budget or --ratio, not both")
    if budget is not None and not 3 <= budget <= max_tokens:
        raise UserError(f"--budget must be between 3 and {max_tokens} tokens, got {budget}")
    if ratio is not None and not 0 < ratio <= 1:
        raise UserError(f"--ratio must be in (0, 1], got {ratio}")
    return cls(context_steps, max_tokens, budget=budget, ratio=ratio, **options)


def load_policy_file(path):
    """Run a Python file outside the package that registers policies with @register
    (a student's or researcher's own policy, without editing dtmem)."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(f"dtmem_user_policy_{path.stem}", path)
    if not path.is_file() or spec is None:
        raise UserError(f"policy file {path} does not exist or is not a Python file")
    before = dict(POLICIES)
    try:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    except Exception as e:  # the user's own code: report it in one line, with its line number
        raise UserError(f"policy file {path} failed: {type(e).__name__}: {e}") from None
    if POLICIES == before:
        raise UserError(f"{path} registers no new policy; decorate its class with @register")


# Import every module of this package so that each policy registers itself.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
