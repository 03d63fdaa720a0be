from dataclasses import dataclass

from dtmem.memory import MemoryPolicy, register

SLACK_STEPS = 16  # extra room, so that compaction runs once every 16 steps, not every step


@register
@dataclass
class Window(MemoryPolicy):
    """Keep the last K steps: the same tokens `recompute` sees, but with cached keys and
    values (computed when older steps were still visible, so not the same numbers)."""

    name = "window"

    def capacity(self):
        return min(self.max_tokens, 3 * (self.context_steps + SLACK_STEPS))

    def max_held(self):
        return min(self.max_tokens, 3 * self.context_steps)

    def after_step(self, cache, timestep, attention):
        # The next step adds a_t, R_{t+1}, s_{t+1}; recompute's window then spans
        # timesteps t-K+2 .. t+1, so everything at or before t-K+1 goes now.
        oldest_kept = timestep - self.context_steps + 2  # [E]
        cache.evict(cache.valid & (cache.timestep < oldest_kept[None, :, None]))
