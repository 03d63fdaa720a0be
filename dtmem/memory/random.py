import torch

from dtmem.memory import ScoredPolicy, register


@register
class Random(ScoredPolicy):
    """Random eviction at the same budget: the sanity floor every policy must beat.
    Seeded, so the same run evicts the same tokens."""

    name = "random"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.generator = torch.Generator().manual_seed(0)

    def score(self, cache, timestep, attention):
        return torch.rand(cache.valid.shape, generator=self.generator).to(cache.valid.device)
