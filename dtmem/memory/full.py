from dataclasses import dataclass

from dtmem.memory import MemoryPolicy, register


@register
@dataclass
class Full(MemoryPolicy):
    """Keep every token of the episode: the KV cache never forgets."""

    name = "full"
