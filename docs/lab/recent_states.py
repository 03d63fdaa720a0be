"""Lab part 3, a worked example: a memory policy that spends its budget on state tokens.

Keep the `budget` most recent state tokens of each layer; returns-to-go and actions go
first whenever the cache is over budget (the newest token, the current state, always
stays). Run it with
    dtmem rollout --env hopper --policy recent-states --policy-file docs/lab/recent_states.py --budget 30
"""

from dataclasses import dataclass

from dtmem.cache import STATE
from dtmem.memory import ScoredPolicy, register


@register
@dataclass
class RecentStates(ScoredPolicy):
    name = "recent-states"

    def score(self, cache, timestep, attention):
        # One score per cached position, [L, E, C]; higher means keep. Every state outranks
        # every other token (the bonus exceeds any arrival index); within a kind, newer
        # tokens outrank older ones.
        is_state = (cache.kind == STATE).float()
        return cache.arrival + is_state * cache.max_arrival_bonus()
