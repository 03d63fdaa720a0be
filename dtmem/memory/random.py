from dataclasses import dataclass, field

import torch

from dtmem.errors import UserError
from dtmem.limits import SEED_MAX
from dtmem.memory import ScoredPolicy, register


@register
@dataclass
class Random(ScoredPolicy):
    """Random eviction at the same budget: the sanity floor every policy must beat.
    Seeded, so the same run evicts the same tokens."""

    name = "random"
    slot_independent = False  # one draw of scores for the whole batch

    seed: int = 0
    """seeds the generator of the scores"""
    generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.seed <= SEED_MAX:
            raise UserError(f"random: seed must be from 0 to {SEED_MAX}, got {self.seed}")
        self.generator = torch.Generator().manual_seed(self.seed)

    def score(self, cache, timestep, attention):
        return torch.rand(cache.valid.shape, generator=self.generator).to(cache.valid.device)
