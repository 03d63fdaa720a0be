"""The contract every registered memory policy keeps, checked on a real (small) DT with
expectations taken from what each policy declares (max_held, slot_independent), never
from its name: the newest token stays, evicted tokens receive no attention, the budget
holds, and per-slot state survives resets and a shrinking batch."""

import pytest
import torch

from dtmem.memory import POLICIES, PolicySpec
from dtmem.model import DecisionTransformer, DTConfig

CACHED = sorted(name for name, cls in POLICIES.items() if cls.uses_cache)


def make(name, budget=12):
    """The policy at a small budget; a learned one with small random parameters, so that
    it does evict, and an update every 16 queries."""
    cls = POLICIES[name]
    options = {}
    if "params" in {f for f in cls.__dataclass_fields__}:
        params = 0.3 * torch.randn(cls.n_params, generator=torch.Generator().manual_seed(1))
        options = {"params": params, "n_up": 16,
                   "stats": (torch.zeros(17), torch.ones(17), 1)}
    return PolicySpec(name, budget if cls.takes_budget else None, options=options).build(4, 300)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DecisionTransformer(DTConfig(state_dim=3, act_dim=2, n_layer=2, n_embd=16,
                                        context_steps=4)).eval()


def inputs(slot, t):
    """Different but fixed inputs per (episode, step), whatever slot the episode is in."""
    g = torch.Generator().manual_seed(1000 * slot + t)
    return torch.rand(2, generator=g), torch.rand(1, generator=g), torch.randn(3, generator=g)


def step(model, cache, policy, episodes, t, checks=True):
    """One decode step of every slot: slot i runs episode episodes[i] at step t (or t[i]);
    returns, per slot, the arrival indices each layer keeps after the policy's eviction."""
    E = len(episodes)
    t = torch.as_tensor(t).expand(E)
    action, rtg, state = (torch.stack(x) for x in zip(*(inputs(e, int(s))
                                                         for e, s in zip(episodes, t))))
    _, attention = model.decode(cache, action, rtg, state, t,
                                torch.ones(E, dtype=torch.bool), want_attention=True)
    if checks:
        assert int(cache.held().max()) <= policy.max_held()  # the budget holds
        for layer, probs in enumerate(attention):  # no attention to evicted positions
            span = probs.shape[-1]
            evicted = ~cache.valid[layer, :, :span][:, None]  # [E, 1, span]
            assert float((probs.sum(2) * evicted).abs().sum()) == 0
    policy.after_step(cache, t, attention if policy.needs_attention else None)
    newest = cache.arrival == (cache.n_arrived - 1)[None, :, None]
    if checks:  # the newest token stays in every layer
        assert bool((cache.valid & newest).any(-1).all())
    return [[sorted(cache.arrival[layer, slot][cache.valid[layer, slot]].tolist())
             for layer in range(cache.n_layers)] for slot in range(E)]


def run(model, policy, episodes, steps, start=0):
    cache = model.new_cache(len(episodes), policy.capacity())
    policy.prepare(cache)
    return cache, [step(model, cache, policy, episodes, t) for t in range(start, steps)]


@pytest.mark.parametrize("name", CACHED)
def test_newest_stays_evicted_get_no_attention_and_budget_holds(model, name):
    policy = make(name)
    _, kept = run(model, policy, [0, 1, 2], 40)
    if policy.max_held() < 3 * 40:  # a policy with a budget did evict
        assert all(len(layer) <= policy.max_held() for layer in kept[-1][0])


@pytest.mark.parametrize("name", [n for n in CACHED if POLICIES[n].slot_independent])
def test_a_shrinking_batch_keeps_each_slot_state(model, name):
    """Episodes 0, 1, 2 in three slots; after 20 steps the batch keeps episodes 0 and 2
    (episode 2 moves to slot 1): they keep exactly the tokens they keep in the batch that
    never shrank."""
    policy = make(name)
    cache, whole = run(model, make(name), [0, 1, 2], 40)
    cache, first = run(model, policy, [0, 1, 2], 20)
    index = torch.tensor([0, 2])
    cache.keep_slots(index)
    policy.keep_slots(index)
    later = [step(model, cache, policy, [0, 2], t) for t in range(20, 40)]
    for t, kept in enumerate(later, start=20):
        assert kept == [whole[t][0], whole[t][2]]


@pytest.mark.parametrize("name", [n for n in CACHED if POLICIES[n].slot_independent])
def test_a_reset_slot_starts_its_new_episode_from_scratch(model, name):
    """Slot 1 runs episode 1 for 15 steps, then is reset and runs episode 5 while slot 0
    goes on with episode 0: slot 1 keeps what episode 5 keeps when run alone."""
    policy = make(name)
    cache, _ = run(model, policy, [0, 1], 15)
    slot = torch.tensor([1])
    cache.reset(slot)
    policy.reset(slot)
    after = [step(model, cache, policy, [0, 5], [15 + t, t]) for t in range(0, 25)]
    alone_policy = make(name)
    alone_cache = model.new_cache(1, alone_policy.capacity())
    alone_policy.prepare(alone_cache)
    alone = [step(model, alone_cache, alone_policy, [5], t) for t in range(0, 25)]
    assert [kept[1] for kept in after] == [kept[0] for kept in alone]
