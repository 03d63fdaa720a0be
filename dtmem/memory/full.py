from dtmem.memory import MemoryPolicy, register


@register
class Full(MemoryPolicy):
    """Keep every token of the episode: the KV cache never forgets."""

    name = "full"
