from dtmem.memory import ScoredPolicy, register

SINK_TOKENS = 4  # StreamingLLM's default number of attention sinks


@register
class Streaming(ScoredPolicy):
    """StreamingLLM: the first few tokens (attention sinks) plus the most recent ones."""

    name = "streaming"

    def score(self, cache, timestep, attention):
        # Newer tokens score higher; sinks score above everything else.
        return cache.arrival + (cache.arrival < SINK_TOKENS) * cache.max_arrival_bonus()
