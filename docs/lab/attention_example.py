"""Lab part 3, a worked example of a policy that reads attention: keep the tokens that the
newest state query attends to most (the rule of the built-in `tova`, written out). Run
it with
    dtmem rollout --env hopper --policy state-attention --policy-file docs/lab/attention_example.py --budget 30
"""

from dataclasses import dataclass

import torch

from dtmem.memory import ScoredPolicy, register


@register
@dataclass
class StateAttention(ScoredPolicy):
    name = "state-attention"
    needs_attention = True  # without it, `attention` is None

    def score(self, cache, timestep, attention):
        L, E, C = cache.valid.shape  # the scores must have this shape: one per cache position
        scores = torch.zeros(L, E, C, device=cache.valid.device)
        for layer, probs in enumerate(attention):  # probs: [E, H, 3, S], S <= C
            # The 3 query rows are the step's new tokens a_{t-1}, R_t, s_t, in that order:
            # row -1 is the newest state's. Average its attention over the H heads.
            from_state = probs[:, :, -1].float().mean(dim=1)  # [E, S]
            # Only the first S positions were read this step; pad to C. Positions from S on
            # hold no token, and only valid positions are ranked, so their 0 is never used.
            scores[layer, :, : from_state.shape[-1]] = from_state
        return scores
