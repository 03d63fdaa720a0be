"""NAMM: features against a straightforward reference, and the policy's rules."""

import numpy as np
import pytest
import torch

from dtmem.memory import PolicySpec
from dtmem.memory.namm import features, io, scorers
from dtmem.model import DecisionTransformer, DTConfig


def reference_spectrogram(signal):
    """Loop-based STFT: periodic Hann 32, hop 16, no centring, one-sided magnitudes."""
    n = np.arange(32)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * n / 32)
    frames = []
    for start in range(0, len(signal) - 32 + 1, 16):
        chunk = signal[start:start + 32] * window
        frames.append([abs(sum(chunk[t] * np.exp(-2j * np.pi * k * t / 32) for t in range(32)))
                       for k in range(17)])
    return np.array(frames)


def test_features_match_a_straightforward_reference():
    rng = np.random.default_rng(0)
    signal = rng.random((3, 16 + 64))  # 3 tokens, 16 carried-over + n_up = 64 samples
    frames = features.spectrogram(torch.tensor(signal))
    assert frames.shape == (3, 4, 17)
    for token in range(3):
        assert np.allclose(frames[token].numpy(), reference_spectrogram(signal[token]), atol=1e-9)

    state = torch.tensor(rng.random((3, 17)))
    first = torch.tensor([0, 2, 4])  # token 2 arrived after the last frame began
    new = features.ema_update(state, frames, first).numpy()
    g16 = 0.99 ** 16
    for token in range(3):
        expected = state[token].numpy() * 0.99 ** 64
        for f in range(4):
            if f >= first[token]:
                expected = expected + g16 ** (3 - f) * (1 - g16) * frames[token, f].numpy()
        assert np.allclose(new[token], expected)

    emb = features.recency(torch.tensor([0, 7]))
    assert torch.allclose(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    freqs = 1 / 50000 ** (np.arange(4) / 4)
    assert np.allclose(emb[1].numpy(), np.concatenate([np.sin(7 * freqs), np.cos(7 * freqs)]))


def test_parameter_counts_match_the_published_layout():
    assert scorers.BAM_PARAMS == 4172 == max(b for _, b, _ in scorers.BAM_LAYOUT.values())
    assert sum(b - a for a, b, _ in scorers.BAM_LAYOUT.values()) == 4172
    assert sum(b - a for a, b, _ in scorers.MLP_LAYOUT.values()) == scorers.MLP_PARAMS


def test_bam_mask_is_backward():
    """Changing the newest token's features changes older tokens' scores, not vice versa."""
    torch.manual_seed(0)
    params = torch.randn(1, 4172) * 0.3
    x = torch.randn(1, 5, 25)  # arrival order
    lengths = torch.tensor([5])
    base = scorers.bam_scores(params, x, lengths)
    newest, oldest = x.clone(), x.clone()
    newest[0, 4] += 1.0
    oldest[0, 0] += 1.0
    assert not torch.allclose(scorers.bam_scores(params, newest, lengths)[0, :4], base[0, :4])
    assert torch.allclose(scorers.bam_scores(params, oldest, lengths)[0, 1:], base[0, 1:])


def masked_bam_reference(params, x):
    """The backward mask written out (token i attends to j >= i), for one unpadded group."""
    p = scorers.unpack(params, scorers.BAM_LAYOUT)
    q, k, v = (x @ p["qkv_w"][0] + p["qkv_b"][0]).split(32, dim=-1)
    logits = (q @ k.T / 32**0.5).masked_fill(torch.ones(len(x), len(x)).tril(-1).bool(),
                                              float("-inf"))
    residual, gate = (logits.softmax(-1) @ v @ p["out_w"][0] + p["out_b"][0]).split(25, -1)
    return (x * (1 + gate) + residual) @ p["read_w"][0] + p["read_b"][0]


def test_bam_scores_of_padded_groups_in_buckets_match_each_group_alone():
    torch.manual_seed(0)
    lengths = torch.tensor([3, 40, 25, 2, 22, 40])  # buckets: 40 40 | 25 22 | 3 2
    params = torch.randn(len(lengths), 4172) * 0.3
    x = torch.randn(len(lengths), 40, 25)
    scores = scorers.bam_scores(params, x, lengths, chunk_elements=2 * 40**2)
    for b, n in enumerate(lengths.tolist()):
        alone = masked_bam_reference(params[b:b + 1], x[b, :n])
        assert torch.allclose(scores[b, :n], alone, atol=1e-5)


def decode_steps(policy, steps=40, slots=2, params=None):
    torch.manual_seed(0)
    model = DecisionTransformer(DTConfig(state_dim=3, act_dim=2, n_layer=2, n_embd=16)).eval()
    cache = model.new_cache(slots, policy.capacity())
    policy.prepare(cache)
    if params is not None:
        policy.params = params
    g = torch.Generator().manual_seed(1)
    held = []
    for t in range(steps):
        step = torch.full((slots,), t)
        _, attention = model.decode(cache, torch.rand(slots, 2, generator=g), torch.zeros(slots, 1),
                                    torch.randn(slots, 3, generator=g), step,
                                    torch.ones(slots, dtype=torch.bool), want_attention=True)
        policy.after_step(cache, step, attention)
        held.append(cache.held().clone())
    return cache, torch.stack(held)


def zero_namm(context_steps, max_tokens, budget=None, **options):
    """A NAMM whose network is all zeros (every score 0: keep everything) and whose
    statistics are still to be collected, as at the start of evolution."""
    return PolicySpec("namm", budget, options={"params": torch.zeros(4172), **options}).build(
        context_steps, max_tokens)


def bias_only(value):
    params = torch.zeros(4172)
    params[4171] = value  # read-out bias: every token scores `value`
    return params


def test_zero_parameters_keep_everything_and_collect_statistics():
    policy = zero_namm(20, 3000)
    cache, held = decode_steps(policy)
    assert int(held[-1].min()) == 3 * 40 - 1
    assert policy.stats[2] > 0 and torch.isfinite(policy.stats[0]).all()


@pytest.mark.parametrize("n_up", [48, 64])
def test_tokens_without_attention_are_neither_scored_nor_counted_in_statistics(n_up):
    # A scorer that would evict everything: only the newest token and the tokens that
    # arrived after the update's n_up queries may remain, and the statistics count only
    # tokens with at least one frame of attention (2 layers, 2 slots, 1 head).
    policy = zero_namm(20, 3000, n_up=n_up)
    first_update = next(t for t in range(40) if 2 + 3 * t >= n_up)
    unseen = 2 + 3 * first_update - n_up
    cache, held = decode_steps(policy, steps=first_update + 1,
                               params=torch.stack([bias_only(-1.0)] * 2))
    assert int(policy.stats[2]) == 2 * 2 * n_up
    assert held[first_update].tolist() == [[max(unseen, 1)] * 2] * 2


def test_each_token_ema_is_built_from_exactly_the_attention_it_received():
    """The policy's buffers (pending query columns, leftovers past n_up, carried-over
    tails, tokens arriving mid-period) against a reference that sees only the attention
    rows the model returned. Slots start at different steps; zero parameters evict
    nothing, so a token's position is its arrival index."""
    torch.manual_seed(0)
    model = DecisionTransformer(DTConfig(state_dim=3, act_dim=2, n_layer=2, n_embd=16)).eval()
    n_up, steps, start = 32, 40, torch.tensor([0, 5])
    policy = zero_namm(20, 3 * steps, n_up=n_up)
    cache = model.new_cache(2, policy.capacity())
    policy.prepare(cache)
    g = torch.Generator().manual_seed(1)
    received = [[[], []], [[], []]]  # [layer][slot]: attention rows, in query order
    for step in range(steps):
        t, active = (step - start).clamp(min=0), step >= start
        _, attention = model.decode(cache, torch.rand(2, 2, generator=g), torch.zeros(2, 1),
                                    torch.randn(2, 3, generator=g), t, active,
                                    want_attention=True)
        for layer, probs in enumerate(attention):
            for slot in range(2):
                for query in range(0 if t[slot] > 0 else 1, 3) if active[slot] else ():
                    received[layer][slot].append(probs[slot, 0, query].double().numpy())
        policy.after_step(cache, t, attention)

    per_frame = 0.99 ** 16
    for layer in range(2):
        for slot in range(2):
            rows = received[layer][slot]
            assert int(cache.length[layer, slot]) == len(rows)  # nothing was evicted
            for token in range(len(rows)):
                samples = np.array([0.0] * 16 + [row[token] if token < len(row) else 0.0
                                                 for row in rows])
                ema = np.zeros(17)
                for k in range(len(rows) // n_up):  # the updates run so far, in order
                    frames = reference_spectrogram(samples[k * n_up:(k + 1) * n_up + 16])
                    ema *= per_frame ** len(frames)
                    for f, frame in enumerate(frames):
                        if token < k * n_up + 16 * (f + 1):  # it had arrived by frame f
                            ema += per_frame ** (len(frames) - 1 - f) * (1 - per_frame) * frame
                state = cache.token_state["namm_ema"][layer, slot, token, 0].double().numpy()
                assert np.allclose(state, ema, atol=1e-6), (layer, slot, token)


def test_an_update_in_blocks_of_tokens_changes_no_number(monkeypatch):
    """An update computes its spectrograms and EMAs in blocks of tokens: blocks of 7 give
    exactly what one block of every token gives (state, statistics and evictions)."""
    runs = []
    for block in (2**14, 7):
        monkeypatch.setattr("dtmem.memory.namm.policy.TOKENS_PER_BLOCK", block)
        policy = zero_namm(20, 3000, n_up=48)
        params = torch.randn(2, 4172, generator=torch.Generator().manual_seed(0)) * 0.3
        cache, held = decode_steps(policy, steps=60, params=params)
        runs.append([held, cache.valid, *cache.token_state.values(), *policy.stats[:2]])
    assert runs[0][0][-1].min() < 3 * 60 - 1  # it did evict
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_negative_scores_evict_all_but_the_unscored_newest_at_each_update_per_slot():
    policy = zero_namm(20, 3000, n_up=48)
    params = torch.stack([bias_only(0.0), bias_only(-1.0)])  # slot 0 keeps, slot 1 forgets
    cache, held = decode_steps(policy, steps=40, params=params)
    # n_up = 48 queries: the first update follows step 16 (2 + 15 * 3 + 3 = 50 >= 48); the
    # two tokens after the 48th query (R_16, s_16) have no attention yet and stay unscored.
    assert int(held[15, :, 1].max()) == 47 and int(held[16, :, 1].max()) == 2
    assert int(held[-1, :, 0].min()) == 3 * 40 - 1
    kept = cache.arrival[0, 1][cache.valid[0, 1]]
    assert int(kept.max()) == int(cache.n_arrived[1]) - 1


def test_hard_cap_and_frozen_statistics():
    policy = zero_namm(20, 3000, budget=10, n_up=48)
    policy.collect_stats = False
    before = policy.stats
    cache, held = decode_steps(policy, steps=40)
    assert policy.stats is before
    after_updates = held[[16, 32], :, :]
    assert int(after_updates.max()) <= 10


def test_n_up_must_be_a_multiple_of_16():
    from dtmem.errors import UserError
    from dtmem.memory.namm import NAMM

    with pytest.raises(UserError):
        NAMM(20, 3000, params=torch.zeros(4172), n_up=40)


def test_import_of_an_original_checkpoint_scores_identically(capsys, tmp_path, checkpoint):
    """A file shaped like the original code's checkpoint: CMA-ES state plus buffers."""
    import json

    from dtmem.cli import main
    from dtmem.memory.namm import NAMM

    torch.manual_seed(3)
    mean = torch.randn(4172) * 0.05
    original = {
        "evolution_state": {"mean": mean, "sigma": torch.tensor(0.065),
                            "C": torch.eye(8), "pc": torch.zeros(8)},
        "buffers": {"memory_policy.token_embedding.online_output_mean": torch.rand(1, 1, 1, 17),
                    "memory_policy.token_embedding.online_output_var": torch.rand(1, 1, 1, 17) + 0.5,
                    "memory_policy.token_embedding.online_output_num": torch.tensor([[[[1234.0]]]])},
    }
    torch.save(original, tmp_path / "original.pt")
    assert main(["namm", "import", str(tmp_path / "original.pt"), "--out",
                 str(tmp_path / "mine.pt"), "--n-up", "48"]) == 0
    imported = NAMM(20, 3000, namm_file=tmp_path / "mine.pt")
    assert torch.equal(imported.params, mean) and imported.stats[2] == 1234
    assert torch.equal(imported.stats[0], original["buffers"][
        "memory_policy.token_embedding.online_output_mean"].reshape(17))
    # The same features give the same scores as the vector used directly.
    x, lengths = torch.randn(2, 6, 25), torch.tensor([6, 4])
    assert torch.equal(scorers.bam_scores(imported.params.expand(2, -1), x, lengths),
                       scorers.bam_scores(mean.expand(2, -1), x, lengths))
    out = tmp_path / "r.json"
    assert main(["rollout", "--policy", "namm", "--namm", str(tmp_path / "mine.pt"),
                 "--episodes", "2", "--checkpoint", str(checkpoint), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["namm"].endswith("mine.pt")


@pytest.mark.parametrize("content, needle", [
    (b"garbage", "corrupt"),
    (None, "holds a bam NAMM of 10 parameters"),
])
def test_bad_namm_files_are_one_line_errors(capsys, tmp_path, checkpoint, content, needle):
    from dtmem.cli import main

    path = tmp_path / "bad.pt"
    if content is None:
        io.save_namm(path, "bam", torch.zeros(10), (torch.zeros(17), torch.ones(17), 1), 48, {})
    else:
        path.write_bytes(content)
    code = main(["rollout", "--policy", "namm", "--namm", str(path), "--checkpoint",
                 str(checkpoint)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err


def test_zero_parameter_namm_reproduces_the_full_rollout_exactly(checkpoint):
    from dtmem.checkpoints import Checkpoint
    from dtmem.rollout import rollout
    from dtmem.tasks import resolve_task

    ckpt = Checkpoint.load(checkpoint)
    task = resolve_task("hopper")
    runs = {}
    for name, policy in (("full", PolicySpec("full").build(20, 3000)),
                         ("namm", zero_namm(20, 3000, n_up=16))):
        results, _ = rollout(ckpt.model, ckpt.state_mean, ckpt.state_std, task, policy,
                             episodes=4, slots=2)
        runs[name] = [(r.ret, r.length, r.max_tokens) for r in results]
    assert runs["namm"] == runs["full"]


def test_slots_keep_their_own_namm_when_the_batch_sheds_finished_ones(checkpoint):
    """8 episodes in 6 slots: once the last two have started, the rollout drops the idle
    slots and renumbers the rest; every remaining slot must keep its own parameters and
    pending queries (episodes 6 and 7 restart slots 0 and 1, so parity still tells)."""
    from dtmem.checkpoints import Checkpoint
    from dtmem.rollout import rollout
    from dtmem.tasks import resolve_task

    ckpt = Checkpoint.load(checkpoint)
    memory = zero_namm(20, 3000, n_up=16)
    memory.params = torch.stack([bias_only(0.0), bias_only(-1.0)] * 3)  # even slots keep all
    results, _ = rollout(ckpt.model, ckpt.state_mean, ckpt.state_std,
                         resolve_task("hopper"), memory, episodes=8, slots=6)
    assert len(memory.pending) < 6  # the batch did shrink
    for i, r in enumerate(results):
        if i % 2 == 0:
            assert r.max_tokens == 3 * r.length - 1
        else:  # the newest token, plus what arrives between two updates
            assert r.max_tokens <= 1 + 16 + 3
