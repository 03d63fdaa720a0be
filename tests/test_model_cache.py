import pytest
import torch

from dtmem.memory import PolicySpec
from dtmem.model import DecisionTransformer, DTConfig


@pytest.fixture
def model():
    torch.manual_seed(0)
    return DecisionTransformer(DTConfig(state_dim=5, act_dim=2, n_layer=2, n_embd=32)).eval()


def episode_inputs(E, T, S=5, A=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(E, T, 1, generator=g), torch.randn(E, T, S, generator=g),
            torch.rand(E, T, A, generator=g) * 2 - 1)


def decode_all(model, cache, rtg, states, actions, policy=None, start=None):
    """Decode T steps for E slots (slot e starts at step start[e]); returns [E, T, A]."""
    E, T, _ = states.shape
    start = torch.zeros(E, dtype=torch.long) if start is None else start
    outputs = []
    for step in range(T):
        t = (step - start).clamp(min=0)
        active = step >= start
        prev = torch.where((t > 0)[:, None], actions[:, step - 1], 0.0)
        out, attn = model.decode(cache, prev, rtg[:, step], states[:, step], t, active,
                                 want_attention=True)
        if policy is not None:
            policy.after_step(cache, t, attn)
        outputs.append(out)
    return torch.stack(outputs, 1), attn


def test_cached_decode_equals_full_forward(model):
    rtg, states, actions = episode_inputs(E=3, T=40)
    reference = model(rtg, states, actions, torch.arange(40).expand(3, 40))
    cache = model.new_cache(3, capacity=120)
    decoded, _ = decode_all(model, cache, rtg, states, actions)
    assert (decoded - reference).abs().max() < 1e-5


def test_slots_starting_at_different_steps_match_their_own_forward(model):
    rtg, states, actions = episode_inputs(E=2, T=30)
    cache = model.new_cache(2, capacity=90)
    start = torch.tensor([0, 7])
    decoded, _ = decode_all(model, cache, rtg, states, actions, start=start)
    # Slot 1 saw steps 7..29 as its timesteps 0..22.
    late = model(rtg[1:, 7:], states[1:, 7:], actions[1:, 7:], torch.arange(23)[None])
    assert (decoded[1, 7:] - late[0]).abs().max() < 1e-5
    early = model(rtg[:1], states[:1], actions[:1], torch.arange(30)[None])
    assert (decoded[0] - early[0]).abs().max() < 1e-5


def test_one_long_slot_among_short_ones_is_read_apart_and_changes_nothing(model):
    """Seven slots start late, so one slot holds far more tokens: attention reads the
    positions past the split for that slot alone, and every slot still matches its own
    full forward."""
    from dtmem.model import ragged_splits

    rtg, states, actions = episode_inputs(E=8, T=40)
    cache = model.new_cache(8, capacity=120)
    start = torch.tensor([0] + [32] * 7)
    decoded, _ = decode_all(model, cache, rtg, states, actions, start=start)
    span, split, long = ragged_splits(cache.length)[0]
    assert long is not None and long.tolist() == [0] and split < span == int(cache.length[0, 0])
    early = model(rtg[:1], states[:1], actions[:1], torch.arange(40)[None])
    assert (decoded[0] - early[0]).abs().max() < 1e-5
    late = model(rtg[1:, 32:], states[1:, 32:], actions[1:, 32:], torch.arange(8).expand(7, 8))
    assert (decoded[1:, 32:] - late).abs().max() < 1e-5


def test_window_compaction_changes_nothing(model):
    """A window cache that compacts often gives the same actions as one that never does."""
    rtg, states, actions = episode_inputs(E=2, T=60)
    results = []
    for capacity in (3 * 60, 3 * 20 + 3):
        policy = PolicySpec("window").build(20, 180)
        cache = model.new_cache(2, capacity)
        results.append(decode_all(model, cache, rtg, states, actions, policy)[0])
        assert int(cache.held().max()) <= 3 * 20
    assert (results[0] - results[1]).abs().max() < 1e-6


def test_a_growing_cache_matches_one_allocated_whole(model, monkeypatch):
    """A cache that starts small and grows (token state included) gives the same actions,
    positions and state as one allocated at full capacity from the start."""
    rtg, states, actions = episode_inputs(E=2, T=30)
    caches, outputs = [], []
    for initial in (90, 8):
        monkeypatch.setattr("dtmem.cache.INITIAL_TOKENS", initial)
        policy = PolicySpec("h2o", ratio=0.5).build(20, 90)
        cache = model.new_cache(2, policy.capacity())
        policy.prepare(cache)
        outputs.append(decode_all(model, cache, rtg, states, actions, policy)[0])
        caches.append(cache)
    whole, grown = caches
    assert grown.valid.shape[2] == 90 and grown.capacity == 90
    assert torch.equal(outputs[0], outputs[1])
    assert torch.equal(whole.valid, grown.valid) and torch.equal(whole.keys, grown.keys)
    assert torch.equal(whole.token_state["h2o_received"], grown.token_state["h2o_received"])


def test_a_shrinking_batch_moves_its_slots_in_place_and_changes_nothing(model, monkeypatch):
    """Dropping a long slot (not even reset) moves the kept slots down in the same memory;
    they grow from there and still match their own full forward."""
    monkeypatch.setattr("dtmem.cache.INITIAL_TOKENS", 8)
    rtg, states, actions = episode_inputs(E=3, T=80)
    cache = model.new_cache(3, capacity=210)
    start = torch.tensor([30, 0, 30])
    decoded = []
    for step in range(80):
        if step == 40:  # slot 1 holds 119 tokens, the others 29 each
            assert cache.allocated == 128
            memory = cache.keys.data_ptr()
            cache.keep_slots(torch.tensor([0, 2]))
            assert cache.allocated == 128 and cache.keys.data_ptr() == memory
            assert cache.held().tolist() == [[29, 29]] * cache.n_layers  # none of slot 1's
            with pytest.raises(ValueError):
                cache.keep_slots(torch.tensor([1, 0]))
            rtg, states, actions, start = (x[[0, 2]] for x in (rtg, states, actions, start))
        t = (step - start).clamp(min=0)
        prev = torch.where((t > 0)[:, None], actions[:, step - 1], 0.0)
        out, _ = model.decode(cache, prev, rtg[:, step], states[:, step], t, step >= start)
        if step >= 30:
            decoded.append(out[[0, 2]] if len(out) == 3 else out)
    assert cache.allocated == 210  # grown past 128 from the moved slots
    own = model(rtg[:, 30:], states[:, 30:], actions[:, 30:], torch.arange(50).expand(2, 50))
    assert (torch.stack(decoded, 1) - own).abs().max() < 1e-5


def test_window_keeps_exactly_the_last_k_steps(model):
    rtg, states, actions = episode_inputs(E=1, T=30)
    policy = PolicySpec("window").build(5, 90)
    cache = model.new_cache(1, policy.capacity())
    decode_all(model, cache, rtg, states, actions, policy)
    for layer in range(2):
        valid = cache.valid[layer, 0]
        order = cache.arrival[layer, 0][valid].argsort()
        kept = cache.timestep[layer, 0][valid][order].tolist()
        # After step 29 the next step (30) needs steps 26..30, so 26..29 stay: R, s, a of
        # 26..28 and R, s of 29 (its action is appended with step 30).
        assert kept == [26] * 3 + [27] * 3 + [28] * 3 + [29] * 2


def test_evicted_tokens_get_zero_attention(model):
    rtg, states, actions = episode_inputs(E=2, T=12)
    cache = model.new_cache(2, capacity=36)
    decode_all(model, cache, rtg[:, :10], states[:, :10], actions[:, :10])
    evict = torch.zeros_like(cache.valid)
    evict[:, 0, 3:9] = True  # layer-wide, slot 0, a run of middle tokens
    evict[1, 1, 0:2] = True  # layer 1 only, slot 1
    cache.evict(evict)
    t = torch.tensor([10, 10])
    _, attn = model.decode(cache, actions[:, 9], rtg[:, 10], states[:, 10], t,
                           torch.tensor([True, True]), want_attention=True)
    for layer, probs in enumerate(attn):
        span = probs.shape[-1]
        assert probs[:, :, :, :span].masked_select(evict[layer, :, None, None, :span]).abs().max() == 0
        assert torch.allclose(probs.sum(-1), torch.ones(()))
