"""Memory policies: each decides which KV-cache tokens a Decision Transformer forgets.

A policy is one small file in this package (or a sub-package, as the NAMM): a dataclass
subclass of MemoryPolicy, registered with @register, whose settings are fields with a
one-line docstring each. The rollout engine calls `after_step` once per env step, after
the new tokens (a_{t-1}, R_t, s_t) were decoded; the policy marks tokens with
`cache.evict`. It never touches the model. `PolicySpec` is the one place a policy is made.
"""

import importlib
import importlib.util
import math
import os
import pkgutil
import traceback
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import ClassVar

import torch

from dtmem.errors import UserError

POLICIES = {}
BUILT_IN = set()  # the names this package registers itself


def register(cls=None, *, replace=False):
    """Class decorator: make a policy available by its `name`. A name that dtmem already
    uses is refused unless replace=True (a student's "h2o" must not silently replace ours)."""
    def add(cls):
        if cls.name in BUILT_IN and not replace:
            raise UserError(f"policy name {cls.name!r} is taken by a built-in policy; rename "
                            "your class's `name`, or use @register(replace=True) to replace it")
        POLICIES[cls.name] = cls
        return cls
    return add(cls) if cls is not None else add


@dataclass
class MemoryPolicy:
    """Base: keep every token. Subclasses override the hooks they need."""

    name: ClassVar[str] = ""
    needs_attention: ClassVar[bool] = False  # True: after_step receives attention rows
    takes_budget: ClassVar[bool] = False  # True: a fixed token count or a ratio is kept
    uses_cache: ClassVar[bool] = True  # False: no KV cache, the last K steps are recomputed
    # False: which tokens a slot keeps depends on the other slots of the batch (e.g. one
    # random draw for the whole batch), so results depend on the slot count.
    slot_independent: ClassVar[bool] = True

    context_steps: int
    """K, the timesteps of the DT's training window"""
    max_tokens: int
    """tokens of a whole episode (3 per step)"""
    task: str = ""
    """the task the policy runs on (for policies whose defaults depend on it)"""

    def capacity(self) -> int:
        """Cache positions per slot this policy needs (compaction reclaims evicted ones)."""
        return self.max_tokens

    def max_held(self) -> int:
        """The most tokens a layer of one slot can hold at a decode step under this policy
        (its budget plus what arrives before it next evicts)."""
        return self.max_tokens

    def prepare(self, cache):
        """Called once with the new cache, e.g. to add per-token state."""

    def reset(self, slots):
        """Episodes restart in these slots; forget any per-slot state."""

    def keep_slots(self, slots):
        """The batch shrinks to these slots (an index tensor), renumbered 0.. in that order;
        keep any per-slot state in step (the cache's own tables are already done)."""

    def after_step(self, cache, timestep, attention):
        """cache: KVCache; timestep [E]: the step just decoded; attention: per layer
        [E, H, n_new, span] probabilities of the new queries (rows of missing tokens are
        zero), or None."""

    def settings(self) -> dict:
        """The settings (dataclass fields) this policy was given away from their defaults."""
        basic = {"context_steps", "max_tokens", "task", "budget", "ratio"}
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.init and f.name not in basic and f.default is not MISSING
                and getattr(self, f.name) != f.default}

    def describe(self) -> dict:
        """What a results file records about this policy beyond its name (settings only
        when some differ from their defaults, so that older results files still match)."""
        settings = self.settings()
        return {"budget": getattr(self, "budget", None), "ratio": getattr(self, "ratio", None),
                **({"settings": settings} if settings else {})}


SLACK_TOKENS = 48  # room beyond a fixed budget, so compaction runs every 16 steps


def keep_top(scores, keep, protected):
    """Mask [L, E, C] of each (layer, slot)'s `keep` [L or 1, E, 1] highest scores, the
    `protected` tokens first; ties go to the older position (a stable sort)."""
    scores = scores.masked_fill(protected, float("inf"))
    rank = scores.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
    return rank < keep


@dataclass
class ScoredPolicy(MemoryPolicy):
    """Keep the `budget` highest-scoring tokens of each layer and slot, or a `ratio` of the
    tokens the episode has produced so far. The newest token always stays (as in NAMM).
    With `pyramid` > 0 the layers share the same total unequally (PyramidKV, Cai et al.
    2024: more in lower layers). Subclasses define `score`; higher means keep."""

    takes_budget: ClassVar[bool] = True

    budget: int | None = None
    """tokens kept per layer (default 3K, the tokens of the DT's own window)"""
    ratio: float | None = None
    """or: the fraction of the episode's tokens so far that is kept"""
    pyramid: float = 0.0
    """PyramidKV slope in [0, 1): layer l of L keeps (1 + pyramid (1 - 2l/(L-1))) x budget"""

    def __post_init__(self):
        if self.budget is None and self.ratio is None:
            self.budget = 3 * self.context_steps
        check_budget(self.budget, self.ratio, self.max_tokens)
        if not 0 <= self.pyramid < 1:
            raise UserError(f"pyramid must be in [0, 1), got {self.pyramid}")

    def most_per_layer(self):
        """The largest per-layer share of a fixed budget, whatever the layer count: layer l
        gets a difference of two roundings of budget x f_l, f_l <= 1 + pyramid."""
        if not self.pyramid:
            return self.budget
        return math.floor(self.budget * (1 + self.pyramid)) + 1

    def capacity(self):
        if self.budget is None:
            return self.max_tokens
        return min(self.max_tokens, self.most_per_layer() + SLACK_TOKENS)

    def max_held(self):
        # A ratio's budget grows with the episode; a fixed one is exceeded only by the
        # 3 tokens of the step decoded before the next eviction.
        if self.budget is None:
            return self.max_tokens
        return min(self.max_tokens, self.most_per_layer() + 3)

    def per_layer(self, keep, n_layers):
        """[E] tokens kept per layer -> [1, E] (the same in every layer) or, with a pyramid,
        [L, E]: layer l keeps keep x f_l, f_l = 1 + pyramid (1 - 2l/(L-1)) falling linearly
        from the first layer to the last, sum f_l = L. Rounded as differences of the
        rounded running sums, so the layers' total stays L x keep; at least 1 each."""
        if not self.pyramid:
            return keep[None]
        L = n_layers
        layer = torch.arange(L, dtype=torch.float64, device=keep.device)
        # Running sum of f over layers 0..l: (l + 1)(1 + pyramid (1 - l/(L-1))); L at l = L-1.
        slope = self.pyramid * (1 - layer / (L - 1)) if L > 1 else torch.zeros_like(layer)
        running = torch.round(((layer + 1) * (1 + slope))[:, None] * keep.double()).long()
        shares = running.diff(dim=0, prepend=torch.zeros_like(running[:1]))
        shares = shares.clamp(min=1)
        if self.budget is not None:  # guards max_held() against rounding of floats
            shares = shares.clamp(max=self.most_per_layer())
        return shares

    def score(self, cache, timestep, attention):
        """[L, E, C] float; only valid positions are read."""
        raise NotImplementedError

    def after_step(self, cache, timestep, attention):
        if self.budget is not None:
            keep = torch.full_like(cache.n_arrived, self.budget)
        else:
            keep = torch.ceil(self.ratio * cache.n_arrived).long().clamp(min=1)
        keep = self.per_layer(keep, cache.n_layers)  # [1 or L, E]
        over = cache.held() > keep  # [L, E]
        if not over.any():
            return
        scores = self.score(cache, timestep, attention)
        if scores.shape != cache.valid.shape:
            raise UserError(f"policy {self.name!r}: score() returned shape "
                            f"{tuple(scores.shape)}; it must be {tuple(cache.valid.shape)}, "
                            "one score per cached position (layers, slots, capacity)")
        scores = scores.float().masked_fill(~cache.valid, float("-inf"))
        newest = cache.valid & (cache.arrival == (cache.n_arrived - 1)[None, :, None])
        kept = keep_top(scores, keep[..., None], newest)
        cache.evict(cache.valid & over[..., None] & ~kept)


def cell_name_of(policy, budget, ratio, settings):
    """A cell's name in tables: h2o@60, l2@0.25, h2o@60[pyramid=0.5]."""
    size = budget if budget is not None else ratio
    name = policy + (f"@{size}" if size is not None else "")
    return name + (f"[{','.join(f'{k}={v}' for k, v in sorted(settings.items()))}]"
                   if settings else "")


def policy_names():
    """Every registered policy, the base (recompute) first."""
    return sorted(POLICIES, key=lambda name: (POLICIES[name].uses_cache, name))


def check_budget(budget, ratio, max_tokens):
    if budget is not None and ratio is not None:
        raise UserError("give either --budget or --ratio, not both")
    if budget is not None and not 3 <= budget <= max_tokens:
        raise UserError(f"--budget must be between 3 and {max_tokens} tokens, got {budget}")
    if ratio is not None and not 0 < ratio <= 1:
        raise UserError(f"--ratio must be in (0, 1], got {ratio}")


def check_setting_type(policy, setting, value):
    """A policy setting's value must be of its field's type: a whole number for an int, a
    finite number for a float (e.g. `--set sinks=abc` is refused before any episode)."""
    kinds = [kind for kind in typing.get_args(setting.type) or (setting.type,)]
    if value is None and type(None) in kinds:
        return
    for kind in kinds:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if (kind is int and number and isinstance(value, int)
                or kind is float and number and math.isfinite(value)
                or kind is str and isinstance(value, os.PathLike)  # a file's path
                or kind not in (int, float, type(None)) and isinstance(value, kind)):
            return
    wanted = " or ".join({int: "a whole number", float: "a finite number", str: "text"}.get(
        kind, kind.__name__) for kind in kinds if kind is not type(None))
    raise UserError(f"policy {policy!r}: setting {setting.name} must be {wanted}, got {value!r}")


@dataclass
class PolicySpec:
    """A memory policy by name with its settings: the one place where policies are made."""

    name: str
    budget: int | None = None
    ratio: float | None = None
    options: dict = field(default_factory=dict)
    """policy-specific settings, by field name (e.g. a NAMM's namm_file)"""
    label: str | None = None
    """names the cell in reports where name and budget do not (e.g. namm-local)"""

    @property
    def policy_class(self):
        if self.name not in POLICIES:
            raise UserError(f"unknown policy {self.name!r}; valid policies: "
                            f"{', '.join(policy_names())}")
        return POLICIES[self.name]

    @property
    def cell_name(self):
        if self.label:
            return self.label
        return cell_name_of(self.name, self.budget, self.ratio,
                            {k: v for k, v in self.options.items() if k != "namm_file"})

    def build(self, context_steps, max_tokens, task="") -> MemoryPolicy:
        """The policy for a DT of K = context_steps on episodes of max_tokens tokens of
        `task` (a name)."""
        cls = self.policy_class
        if (self.budget is not None or self.ratio is not None) and not cls.takes_budget:
            raise UserError(f"policy {self.name!r} takes no --budget or --ratio")
        settings = {f.name: f for f in fields(cls) if f.init
                    and f.name not in ("context_steps", "max_tokens", "task", "budget", "ratio")}
        sizes_given = sorted({"budget", "ratio"} & set(self.options))
        if sizes_given:
            raise UserError(f"give {', '.join(sizes_given)} as --{sizes_given[0]}, not as a "
                            "policy setting")
        unknown = sorted(set(self.options) - set(settings))
        if unknown:
            raise UserError(f"policy {self.name!r} has no setting {', '.join(unknown)}; its "
                            f"settings: {', '.join(sorted(settings)) or 'none'}")
        for name, value in self.options.items():
            check_setting_type(self.name, settings[name], value)
        sizes = {"budget": self.budget, "ratio": self.ratio} if cls.takes_budget else {}
        return cls(context_steps=context_steps, max_tokens=max_tokens, task=task, **sizes,
                   **self.options)


def load_policy_file(path):
    """Run a Python file outside the package that registers policies with @register
    (a student's or researcher's own policy, without editing dtmem)."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(f"dtmem_user_policy_{path.stem}", path)
    if not path.is_file() or spec is None:
        raise UserError(f"policy file {path} does not exist or is not a Python file")
    before = dict(POLICIES)
    try:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    except UserError as e:
        raise UserError(f"policy file {path}: {e}") from None
    except (Exception, SystemExit) as e:  # the user's own code: one line, with where it failed
        lines = [frame.lineno for frame in traceback.extract_tb(e.__traceback__)
                 if Path(frame.filename).resolve() == path.resolve()]
        where = f" at line {lines[-1]}" if lines else ""  # a SyntaxError names its own line
        raise UserError(f"policy file {path} failed{where}: {type(e).__name__}: {e}") from None
    if POLICIES == before:
        raise UserError(f"{path} registers no new policy; decorate its class with @register")


# Import every module of this package so that each policy registers itself.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
BUILT_IN.update(POLICIES)
