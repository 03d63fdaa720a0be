from dataclasses import dataclass

from dtmem.errors import UserError
from dtmem.memory import ScoredPolicy, register


@register
@dataclass
class Streaming(ScoredPolicy):
    """StreamingLLM: the first few tokens (attention sinks) plus the most recent ones."""

    name = "streaming"

    sinks: int = 4
    """first tokens of the episode always kept (StreamingLLM's default: 4)"""

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.sinks <= self.max_tokens:
            raise UserError(f"streaming: sinks must be from 0 to the episode's "
                            f"{self.max_tokens} tokens, got {self.sinks}")

    def score(self, cache, timestep, attention):
        # Newer tokens score higher; sinks score above everything else.
        return cache.arrival + (cache.arrival < self.sinks) * cache.max_arrival_bonus()
