from dataclasses import dataclass

import torch

from dtmem.memory import ScoredPolicy, register


@register
@dataclass
class TOVA(ScoredPolicy):
    """TOVA (Oren et al. 2024, "Transformers are Multi-State RNNs"): keep the tokens that
    the current query attends to most, its attention averaged over heads, per layer. No
    state: each step's choice reads only that step's attention.

    Deviations forced by the DT: a step decodes 3 tokens (a_{t-1}, R_t, s_t) together, so
    eviction runs once per step (up to 3 tokens at a time, not 1 per decoded token), and
    "the current query" is s_t's, the last valid query row of the step. It is the newest
    token, the one whose output predicts a_t (in the last layer nothing else is read),
    and the only query of the step that sees all three new tokens (causally, a_{t-1}'s
    query sees neither R_t nor s_t)."""

    name = "tova"
    needs_attention = True

    def score(self, cache, timestep, attention):
        scores = torch.zeros(cache.valid.shape, device=cache.valid.device)
        for layer, probs in enumerate(attention):  # [E, H, n_new, span]
            # s_t always exists for a slot that decoded a step, and it comes last; an idle
            # slot's rows are zero, and it decoded nothing, so it holds nothing to evict.
            scores[layer, :, : probs.shape[-1]] = probs[:, :, -1].float().mean(dim=1)
        return scores
