from dataclasses import dataclass

import torch

from dtmem.memory import ScoredPolicy, register


@register
@dataclass
class HeavyHitters(ScoredPolicy):
    """H2O: half the budget for the most recent tokens, half for the "heavy hitters", the
    older tokens that have received the most attention so far (summed over every query
    since they arrived, averaged over heads, per layer)."""

    name = "h2o"
    needs_attention = True

    def prepare(self, cache):
        cache.add_token_state("h2o_received")

    def after_step(self, cache, timestep, attention):
        received = cache.token_state["h2o_received"]
        for layer, probs in enumerate(attention):  # [E, H, n_new, span]
            received[layer, :, : probs.shape[-1]] += probs.mean(dim=1).sum(dim=1)
        super().after_step(cache, timestep, attention)

    def score(self, cache, timestep, attention):
        if self.budget is not None:
            recent = torch.full_like(cache.n_arrived, self.budget // 2)
        else:
            recent = torch.ceil(self.ratio * cache.n_arrived / 2).long()
        recent = self.per_layer(recent, cache.n_layers)  # [1 or L, E]: half of each share
        is_recent = cache.arrival >= (cache.n_arrived - recent)[..., None]
        # Attention received is at most the number of queries: recent tokens outrank it.
        return cache.token_state["h2o_received"] + is_recent * cache.max_arrival_bonus()
