from dataclasses import dataclass

from dtmem.memory import ScoredPolicy, register


@register
@dataclass
class KeyNorm(ScoredPolicy):
    """L2-norm (Devoto et al. 2024): keys with a LOW L2 norm tend to draw high attention,
    so those are kept. Applied to every layer and from the first step (the reference
    skips the first layers and short contexts; a 3-layer DT has few layers to spare)."""

    name = "l2"

    def score(self, cache, timestep, attention):
        return -cache.keys.float().norm(dim=-1).mean(-1)  # [L, E, C, H, D] -> [L, E, C]
