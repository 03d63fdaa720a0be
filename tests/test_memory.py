"""Every memory policy through one matrix, then each heuristic's rule on a constructed cache."""

import json

import pytest
import torch

from dtmem.cli import main
from dtmem.memory import POLICIES, PolicySpec
from dtmem.memory.namm.io import save_namm
from dtmem.model import DecisionTransformer, DTConfig


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_every_policy_runs_from_the_cli_within_what_it_declares(capsys, tmp_path, checkpoint,
                                                                 policy):
    out = tmp_path / "r.json"
    cls = POLICIES[policy]
    extra = ["--budget", "30"] if cls.takes_budget else []
    options = {}
    if "namm_file" in cls.__dataclass_fields__:  # a NAMM file of small random parameters
        params = torch.randn(cls.n_params, generator=torch.Generator().manual_seed(0))
        save_namm(tmp_path / "n.pt", cls.scorer, params * 0.1,
                  (torch.zeros(17), torch.ones(17), 1), 48, {})
        extra += ["--namm", str(tmp_path / "n.pt")]
        options = {"namm_file": tmp_path / "n.pt"}
    code = main(["rollout", "--env", "hopper", "--policy", policy, "--episodes", "3",
                 "--slots", "2", "--checkpoint", str(checkpoint), "--json", str(out), *extra])
    assert code == 0, capsys.readouterr().err
    summary = json.loads(out.read_text())["summary"]
    declared = PolicySpec(policy, 30 if cls.takes_budget else None, options=options).build(
        20, 3000)
    assert summary["max_tokens"] <= declared.max_held()
    assert len(summary["layer_max_tokens"]) == 2  # the test checkpoint has 2 layers


def filled_cache(steps=12, slots=1):
    """A 2-layer cache after `steps` decoded steps (3 tokens each, minus the first action)."""
    torch.manual_seed(0)
    model = DecisionTransformer(DTConfig(state_dim=3, act_dim=2, n_layer=2, n_embd=16)).eval()
    cache = model.new_cache(slots, capacity=3 * steps)
    for t in range(steps):
        model.decode(cache, torch.zeros(slots, 2), torch.zeros(slots, 1),
                     torch.randn(slots, 3), torch.full((slots,), t),
                     torch.ones(slots, dtype=torch.bool))
    return cache


def kept_arrivals(cache, layer=0, slot=0):
    return sorted(cache.arrival[layer, slot][cache.valid[layer, slot]].tolist())


def test_streaming_keeps_sinks_and_the_most_recent():
    cache = filled_cache()  # 35 tokens, arrivals 0..34
    policy = PolicySpec("streaming", budget=10).build(20, 3000)
    policy.after_step(cache, torch.tensor([11]), None)
    assert kept_arrivals(cache) == [0, 1, 2, 3, 29, 30, 31, 32, 33, 34]


def test_h2o_keeps_the_recent_half_and_the_heaviest_older_tokens():
    cache = filled_cache()
    policy = PolicySpec("h2o", budget=8).build(20, 3000)
    policy.prepare(cache)
    heavy = [2, 7, 11, 20]
    cache.token_state["h2o_received"][:, 0, heavy] = torch.tensor([5.0, 4.0, 3.0, 2.0])
    cache.token_state["h2o_received"][:, 0, 0] = 1.0
    policy.after_step(cache, torch.tensor([11]), [torch.zeros(1, 1, 3, 35)] * 2)
    assert kept_arrivals(cache) == heavy + [31, 32, 33, 34]


def test_l2_keeps_the_lowest_key_norms_and_the_newest():
    cache = filled_cache()
    norms = torch.arange(35, 0, -1).float()  # oldest tokens have the largest norms
    norms[5] = 0.5
    cache.keys[:, 0, :35] = norms[None, :, None, None] / cache.keys.shape[-1] ** 0.5
    policy = PolicySpec("l2", budget=4).build(20, 3000)
    policy.after_step(cache, torch.tensor([11]), None)
    assert kept_arrivals(cache) == [5, 32, 33, 34]


def test_random_keeps_the_budget_with_the_newest_and_is_seeded():
    kept = []
    for _ in range(2):
        cache = filled_cache()
        PolicySpec("random", budget=6).build(20, 3000).after_step(cache, torch.tensor([11]), None)
        kept.append(kept_arrivals(cache, layer=1))
        assert len(kept[-1]) == 6 and 34 in kept[-1]
    assert kept[0] == kept[1]


def test_tova_keeps_what_the_state_query_attends_to_averaged_over_heads():
    cache = filled_cache()  # the last step's queries: a_10 (32), R_11 (33), s_11 (34)
    policy = PolicySpec("tova", budget=4).build(20, 3000)
    probs = torch.zeros(1, 2, 3, 35)  # [E, H, queries, span]: two heads
    probs[0, :, :2, 20] = 1.0  # the a_{t-1} and R_t queries: ignored
    probs[0, 0, 2, [3, 17, 20]] = torch.tensor([0.5, 0.3, 0.2])  # s_t, head 0
    probs[0, 1, 2, [9, 17, 20]] = torch.tensor([0.6, 0.3, 0.1])  # s_t, head 1
    other = torch.zeros(1, 2, 3, 35)
    other[0, :, 2, [5, 6, 7]] = 1 / 3
    policy.after_step(cache, torch.tensor([11]), [probs, other])
    # Head means: 9 and 17 0.3, 3 0.25, 20 0.15 (not 1.0: a_{t-1} and R_t do not count).
    assert kept_arrivals(cache, layer=0) == [3, 9, 17, 34]
    assert kept_arrivals(cache, layer=1) == [5, 6, 7, 34]


def test_snapkv_pools_older_tokens_votes_over_held_neighbours_and_keeps_the_window():
    cache = filled_cache()
    cache.evict(cache.arrival == 11)
    policy = PolicySpec("snapkv", budget=9, options={"window": 6, "kernel": 3}).build(20, 3000)
    policy.prepare(cache)
    votes = torch.zeros(35)
    votes[[10, 20, 28, 29]] = torch.tensor([3.0, 2.7, 2.8, 5.0])  # 29 is in the window
    cache.token_state["snapkv_rows"][:, 0, :35, 0] = votes
    policy.after_step(cache, torch.tensor([11]), [torch.zeros(1, 1, 3, 35)] * 2)
    # Pooled (mean of 3 held neighbours): 9, 10, 12 get 1.0 (11 is gone), 19..21 0.9, 27
    # and 28 0.93 (29's votes do not spill: the window's are not pooled); the window 29..34.
    assert kept_arrivals(cache) == [9, 10, 12, 29, 30, 31, 32, 33, 34]


@pytest.mark.parametrize("window, kept", [(3, [12, 20, 32, 33, 34]),
                                          (6, [5, 12, 29, 30, 31, 32, 33, 34])])
def test_snapkv_votes_with_the_last_window_queries_only(window, kept):
    """Votes of queries that left the window are overwritten by the newest ones."""
    cache = filled_cache()
    policy = PolicySpec("snapkv", budget=window + 2,
                        options={"window": window, "kernel": 1}).build(20, 3000)
    policy.prepare(cache)
    cache.token_state["snapkv_rows"][:, 0, 5] = 1.0  # 5 had a vote from every older query
    probs = torch.zeros(1, 1, 3, 35)
    probs[0, 0, :, 12], probs[0, 0, :, 20] = 0.6, 0.4  # the 3 newest queries (32, 33, 34)
    policy.after_step(cache, torch.tensor([11]), [probs, probs])
    assert kept_arrivals(cache) == kept


def test_keydiff_keeps_the_keys_least_similar_to_the_mean_key():
    cache = filled_cache()
    e0, e1 = torch.eye(cache.keys.shape[-1])[:2]
    keys = torch.arange(1, 36).float()[:, None] * e0  # most keys point the same way
    keys[7] = -0.01 * e0  # opposite (and a tiny norm: only the direction counts)
    keys[15] = e1  # orthogonal
    keys[22] = e0 + e1  # 45 degrees
    cache.keys[:, 0, :35] = keys[:, None]
    PolicySpec("keydiff", budget=4).build(20, 3000).after_step(cache, torch.tensor([11]), None)
    assert kept_arrivals(cache) == [7, 15, 22, 34]


def test_pyramid_gives_lower_layers_more_of_the_same_total():
    cache = filled_cache()
    policy = PolicySpec("streaming", budget=10, options={"pyramid": 0.4}).build(20, 3000)
    policy.after_step(cache, torch.tensor([11]), None)
    assert kept_arrivals(cache, layer=0) == [0, 1, 2, 3, *range(25, 35)]  # 1.4 x 10
    assert kept_arrivals(cache, layer=1) == [0, 1, 2, 3, 33, 34]  # 0.6 x 10
    assert policy.max_held() >= 14 + 3 and policy.describe()["settings"] == {"pyramid": 0.4}
    assert "pyramid" not in PolicySpec("streaming", budget=10).build(20, 3000).describe()


def test_ratio_budget_follows_the_episode_length():
    cache = filled_cache()
    PolicySpec("streaming", ratio=0.2).build(20, 3000).after_step(cache, torch.tensor([11]), None)
    assert len(kept_arrivals(cache)) == 7  # ceil(0.2 * 35)


def test_evicted_state_follows_compaction():
    """Per-token policy state moves with its token when the cache compacts."""
    cache = filled_cache()
    state = cache.add_token_state("probe")
    state[:, 0, :35] = torch.arange(35).float()
    cache.evict(cache.arrival % 2 == 1)
    cache.compact(torch.ones(2, 1, dtype=torch.bool))
    valid = cache.valid[0, 0]
    assert torch.equal(state[0, 0][valid], cache.arrival[0, 0][valid].float())


@pytest.mark.parametrize("argv, needle", [
    (["--policy", "h2o", "--budget", "1"], "must be an integer from 3"),
    (["--policy", "h2o", "--budget", "5000"], "--budget must be between"),
    (["--policy", "l2", "--ratio", "0"], "must be a number from"),
    (["--policy", "l2", "--ratio", "1.5"], "must be a number from"),
    (["--policy", "full", "--budget", "60"], "takes no --budget"),
    (["--policy", "recompute", "--ratio", "0.5"], "takes no --budget"),
    (["--policy", "streaming", "--budget", "60", "--ratio", "0.5"], "not both"),
])
def test_bad_budgets_are_one_line_errors(capsys, argv, needle):
    code = main(["rollout", *argv])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err


def test_a_policy_file_registers_a_policy_or_says_what_is_wrong(capsys, tmp_path, checkpoint,
                                                                monkeypatch):
    from dtmem.lab import LAB_DIR

    lab_policy = ["--policy", "recent-states", "--policy-file", str(LAB_DIR / "recent_states.py")]
    assert main(["rollout", "--env", "hopper", *lab_policy, "--budget", "9", "--episodes", "1",
                 "--checkpoint", str(checkpoint)]) == 0
    assert "recent-states" in capsys.readouterr().out
    silent = tmp_path / "silent.py"
    silent.write_text("x = 1\n")
    broken = tmp_path / "broken.py"
    broken.write_text("def oops(:\n")
    raising = tmp_path / "raising.py"
    raising.write_text("x = 1\nraise ValueError('no such model')\n")
    exiting = tmp_path / "exiting.py"
    exiting.write_text("import sys\nsys.exit(3)\n")
    policy = ("from dataclasses import dataclass\nfrom dtmem.memory import ScoredPolicy, register"
              "\n@register\n@dataclass\nclass Mine(ScoredPolicy):\n    name = {name!r}\n"
              "    def score(self, cache, timestep, attention):\n        return {score}\n")
    clash = tmp_path / "clash.py"
    clash.write_text(policy.format(name="h2o", score="cache.arrival"))
    wrong = tmp_path / "wrong.py"
    wrong.write_text(policy.format(name="wrong-shape", score="cache.arrival[0]"))
    monkeypatch.chdir(tmp_path)
    for path, name, needle in ((tmp_path / "missing.py", "x", "does not exist"),
                               (silent, "x", "registers no new policy"),
                               (broken, "x", "SyntaxError"),
                               (raising.relative_to(tmp_path), "x",  # run from tmp_path
                                "failed at line 2: ValueError: no such model"),
                               (exiting, "x", "failed at line 2: SystemExit: 3"),
                               (clash, "h2o", "taken by a built-in policy"),
                               (wrong, "wrong-shape", "score() returned shape")):
        code = main(["rollout", "--env", "hopper", "--policy", name, "--policy-file", str(path),
                     "--budget", "9", "--episodes", "1", "--checkpoint", str(checkpoint)])
        err = capsys.readouterr().err
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert POLICIES["h2o"].__module__ == "dtmem.memory.h2o"  # the clash replaced nothing
