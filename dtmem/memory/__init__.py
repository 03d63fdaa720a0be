"""Memory policies: each decides which KV-cache tokens a Decision Transformer forgets.

A policy is one small file in this package: a subclass of MemoryPolicy registered with
@register. The rollout engine calls `after_step` once per env step, after the new
tokens (a_{t-1}, R_t, s_t) were decoded; the policy marks tokens with `cache.evict`.
It never touches the model. `recompute` (re-running the last K steps from scratch each
step, the field's standard) is not a cache policy; the rollout engine runs it itself.
"""

import importlib
import pkgutil

from dtmem.errors import UserError

POLICIES = {}


def register(cls):
    POLICIES[cls.name] = cls
    return cls


class MemoryPolicy:
    name = ""
    needs_attention = False  # True: after_step receives attention probabilities

    def __init__(self, context_steps: int, max_tokens: int):
        self.context_steps = context_steps  # K of the DT
        self.max_tokens = max_tokens  # tokens of a whole episode (3 per step)

    def capacity(self) -> int:
        """Cache positions per slot this policy needs (compaction reclaims evicted ones)."""
        return self.max_tokens

    def reset(self, slots):
        """Episodes restart in these slots; forget any per-slot state."""

    def after_step(self, cache, timestep, attention):
        """cache: KVCache; timestep [E]: the step just decoded; attention: per layer
        [E, H, n_new, span] probabilities of the new queries, or None."""


def policy_names():
    return ["recompute", *POLICIES]


def make_policy(name, context_steps, max_tokens) -> MemoryPolicy:
    if name not in POLICIES:
        raise UserError(f"unknown policy {name!r}; valid policies: {', '.join(policy_names())}")
    return POLICIES[name](context_steps, max_tokens)


# Import every module of this package so that each policy registers itself.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
