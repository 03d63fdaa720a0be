import numpy as np
import pytest

from dtmem.behavior import MLPPolicy
from dtmem.bench import env_floor
from dtmem.cli import main
from dtmem.errors import UserError


def tiny_policy(obs_dim=11, act_dim=3, seed=0):
    rng = np.random.default_rng(seed)
    weights = [(rng.normal(size=(obs_dim, 8)), np.zeros(8)),
               (rng.normal(size=(8, act_dim)), np.zeros(act_dim))]
    return MLPPolicy(weights, log_std=np.full(act_dim, -1.0), obs_mean=np.zeros(obs_dim),
                     obs_var=np.ones(obs_dim), action_low=-np.ones(act_dim),
                     action_high=np.ones(act_dim), activation="tanh")


def test_policy_file_round_trip_and_corruption(tmp_path):
    policy = tiny_policy()
    policy.save(tmp_path / "p.npz")
    loaded = MLPPolicy.load(tmp_path / "p.npz", deterministic=True)
    obs = np.random.default_rng(1).normal(size=(5, 11))
    assert np.array_equal(policy.mean(obs), loaded.mean(obs))
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(UserError):
        MLPPolicy.load(tmp_path / "bad.npz")


def test_data_build_with_a_policy_file_and_a_wrong_sized_one(capsys, tmp_path, minari_root):
    tiny_policy().save(tmp_path / "hopper.npz")
    tiny_policy(obs_dim=17, act_dim=6).save(tmp_path / "walker.npz")
    assert main(["data", "build", "--task", "hopper-expert", "--behavior",
                 str(tmp_path / "hopper.npz"), "--steps", "200", "--envs", "2"]) == 0
    assert "built dtmem/hopper/hopper-v0: " in capsys.readouterr().out  # named by its policy
    assert main(["data", "build", "--task", "hopper-expert", "--behavior",
                 str(tmp_path / "hopper.npz"), "--dataset", "dtmem/hopper/expert-v0",
                 "--steps", "200", "--envs", "2"]) == 0
    assert "built dtmem/hopper/expert-v0: 25 episodes, 200 steps" in capsys.readouterr().out
    code = main(["data", "build", "--task", "hopper-expert", "--overwrite", "--behavior",
                 str(tmp_path / "walker.npz"), "--steps", "200"])
    err = capsys.readouterr().err
    assert code == 2 and "not Hopper-v5's" in err
    from dtmem.data import is_local
    assert is_local("dtmem/hopper/expert-v0")  # the failed rebuild lost nothing


def test_bench_rows_compare_against_the_same_episodes(checkpoint):
    from dtmem.bench import memory_configs, rollout_configs, run_bench
    from dtmem.checkpoints import Checkpoint
    from dtmem.memory import POLICIES
    from dtmem.tasks import resolve_task

    ckpt = Checkpoint.load(checkpoint)
    task = resolve_task("hopper")
    assert rollout_configs((1, 2)) == [("recompute", 1), ("window", 1), ("window", 2),
                                       ("full", 1), ("full", 2)]
    assert {p for p, _ in memory_configs((2,))} == set(POLICIES)
    rows = run_bench(ckpt, task, [("recompute", 1), ("h2o", 2)])
    assert all(steps > 0 and wall > 0 and floor > 0 and peak > 100
               for _, _, steps, wall, floor, peak in rows)
    assert env_floor(task, [5, 3, 4], 2) > 0


def test_shipped_hopper_policy_collects_longer_episodes_than_random():
    from dtmem.data import collect_episodes, make_behavior
    from dtmem.tasks import make_env, resolve_task

    task = resolve_task("hopper")
    env = make_env(task)
    lengths = {}
    for name in ("random", "expert"):
        policy = make_behavior(name, task, env.observation_space, env.action_space)
        episodes = collect_episodes(task, policy, 400, seed=0, n_envs=2, progress=False)
        lengths[name] = np.mean([len(e["actions"]) for e in episodes])
    assert lengths["expert"] > 5 * lengths["random"]


def test_bench_generation_times_a_whole_population(checkpoint):
    from dtmem.bench import bench_generation
    from dtmem.checkpoints import Checkpoint
    from dtmem.tasks import resolve_task

    wall, floor, results = bench_generation(Checkpoint.load(checkpoint), resolve_task("hopper"),
                                            population=3, episodes=2, n_up=16)
    assert len(results) == 6 and wall > 0 and floor > 0
    # Common random numbers: the two episodes of every member share their env seeds.
    assert [r.seed for r in results] == [1000, 1001] * 3


def test_bench_train_times_every_variant_of_the_real_update():
    from dtmem.bench import training_rates
    from dtmem.model import DTConfig

    rows, peak = training_rates(DTConfig(state_dim=11, act_dim=3, n_layer=1, n_embd=16),
                                batch_size=4, updates=2)
    assert [name for name, _, _ in rows] == ["fp32", "fp32, fused AdamW", "bf16 autocast",
                                              "bf16, fused AdamW"]
    assert all(rate > 0 and gflops > 0 for _, rate, gflops in rows) and peak > 0


def test_bench_train_compiles_the_real_update_when_asked():
    from dtmem.bench import training_rates
    from dtmem.model import DTConfig

    rows, _ = training_rates(DTConfig(state_dim=11, act_dim=3, n_layer=1, n_embd=16),
                             batch_size=4, updates=1, compiled=True)
    assert rows[-1][0] == "bf16, fused, compile"
    assert all(rate > 0 for _, rate, _ in rows)
