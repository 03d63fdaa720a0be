from dataclasses import dataclass

from dtmem.memory import MemoryPolicy, register


@register
@dataclass
class Recompute(MemoryPolicy):
    """The field's standard evaluation: no KV cache; at every env step the last K steps are
    re-run with a full forward (the rollout engine's RecomputeDecoder)."""

    name = "recompute"
    uses_cache = False
