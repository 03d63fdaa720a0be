from dataclasses import dataclass

import torch.nn.functional as F

from dtmem.memory import ScoredPolicy, register


@register
@dataclass
class KeyDiff(ScoredPolicy):
    """KeyDiff (Park et al. 2025, "KeyDiff: Key Similarity-Based KV Cache Eviction for
    Long-Context LLM Inference in Resource-Constrained Environments"): attention-free; keep
    the most distinctive keys, those with the lowest cosine similarity to the anchor, the
    mean of the held tokens' unit-normalised keys.

    Deviations forced by the DT: KeyDiff scores and evicts per KV head; dtmem's cache keeps
    one validity per layer, so a token's similarity is averaged over the layer's heads
    (the shipped DTs have one head: there it is the published rule). KeyDiff evicts after
    each block of incoming tokens; here a block is one DT step (3 tokens), and the anchor
    includes that step's tokens, as the paper's includes the incoming block's."""

    name = "keydiff"

    def score(self, cache, timestep, attention):
        keys = F.normalize(cache.keys.float(), dim=-1)  # [L, E, C, H, D]
        held = cache.valid[..., None, None]  # [L, E, C, 1, 1]
        anchor = (keys * held).sum(2, keepdim=True) / held.sum(2, keepdim=True).clamp(min=1)
        return -F.cosine_similarity(keys, anchor, dim=-1).mean(-1)  # [L, E, C]
