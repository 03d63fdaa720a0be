import numpy as np

from dtmem.data import Episodes, WindowSampler, collect_episodes, find_dataset
from dtmem.tasks import resolve_task


def test_dataset_is_real_minari_with_references(hopper_dataset):
    task = resolve_task("hopper")
    dataset, dataset_id = find_dataset(task)
    assert dataset_id == task.local_id
    assert dataset.total_steps == 3000  # exactly the steps asked for
    meta = dataset.storage.metadata
    assert meta["ref_min_score"] == task.ref_min and meta["ref_max_score"] == task.ref_max
    assert meta["algorithm_name"] == "sb3/PPO" and meta["requirements"]
    episode = next(dataset.iterate_episodes())
    assert len(episode.observations) == len(episode.actions) + 1  # Minari's N + 1
    assert episode.infos == {} and "EpisodeData" in str(episode)  # prints, as Minari's do
    last = list(dataset.iterate_episodes())[-1]
    assert last.truncations[-1]  # the episode the step budget cut


def test_episodes_drop_the_final_observation_and_compute_returns_to_go(hopper_dataset):
    dataset, _ = find_dataset(resolve_task("hopper"))
    episodes = Episodes.from_minari(dataset)
    first = next(dataset.iterate_episodes())
    n = len(first.actions)
    assert np.allclose(episodes.states[:n], first.observations[:n])
    rtg = episodes.returns_to_go()
    naive = [sum(first.rewards[i:]) for i in range(n)]
    assert np.allclose(rtg[:n], naive, rtol=1e-5)
    assert np.isclose(episodes.returns()[0], first.rewards.sum())
    assert len(episodes.states) == episodes.lengths.sum() == dataset.total_steps


def test_windows_are_masked_right_padded_and_aligned(hopper_dataset):
    dataset, _ = find_dataset(resolve_task("hopper"))
    episodes = Episodes.from_minari(dataset)
    mean, std = episodes.state_stats()
    sampler = WindowSampler(episodes, 20, 1000.0, mean, std, seed=0)
    batch = sampler.sample(256)
    assert batch["states"].shape == (256, 20, 11) and batch["actions"].shape == (256, 20, 3)
    mask = batch["mask"].numpy()
    # Masks are a prefix of ones (right padding) and padded entries are zero.
    assert (np.diff(mask.astype(int), axis=1) <= 0).all() and mask[:, 0].all()
    assert (batch["states"].numpy()[~mask] == 0).all()
    # Hopper's random episodes are short, so padding must occur.
    assert not mask.all()
    # Each window's states follow one episode: check one against the raw data.
    i = int(np.argmax(mask.sum(1)))
    t0 = int(batch["timesteps"][i, 0])
    raw = (episodes.states * 1.0 - mean) / std
    matches = [s for s, n in zip(episodes.starts, episodes.lengths)
               if t0 + mask[i].sum() <= n
               and np.allclose(raw[s + t0], batch["states"][i, 0].numpy(), atol=1e-5)]
    assert matches


def test_same_seed_same_data():
    task = resolve_task("hopper")
    from dtmem.behavior import RandomPolicy
    from dtmem.tasks import make_env

    space = make_env(task).action_space
    runs = [collect_episodes(task, RandomPolicy(space.low, space.high), 300, seed=3,
                             n_envs=4, progress=False) for _ in range(2)]
    assert len(runs[0]) == len(runs[1])
    for a, b in zip(*runs):
        assert a["seed"] == b["seed"] and np.array_equal(a["observations"], b["observations"])
        assert a["truncations"][-1] or a["terminations"][-1]


def test_training_on_any_minari_id_scores_against_that_datasets_references(
        capsys, tmp_path, monkeypatch, hopper_dataset):
    import json

    import minari
    from minari.data_collector import EpisodeBuffer

    from dtmem.behavior import RandomPolicy
    from dtmem.cli import main
    from dtmem.tasks import make_env

    task = resolve_task("hopper")
    env = make_env(task)
    policy = RandomPolicy(env.action_space.low, env.action_space.high)
    episodes = collect_episodes(task, policy, 400, seed=5, n_envs=2, progress=False)
    minari.create_dataset_from_buffers(  # an official-layout id, its own references
        "mujoco/hopper/simple-v0", [EpisodeBuffer(id=i, **e) for i, e in enumerate(episodes)],
        env=env, ref_min_score=0.0, ref_max_score=1000.0, algorithm_name="test")
    out = tmp_path / "dt.pt"
    assert main(["train", "--task", "hopper-medium", "--dataset", "mujoco/hopper/simple-v0",
                 "--steps", "3", "--n-layer", "1", "--n-embd", "16", "--eval-every", "0",
                 "--eval-episodes", "1", "--warmup-steps", "1", "--out", str(out)]) == 0
    assert main(["rollout", "--checkpoint", str(out), "--episodes", "2",
                 "--json", str(tmp_path / "r.json")]) == 0
    cell = json.loads((tmp_path / "r.json").read_text())
    assert cell["dataset_id"] == "mujoco/hopper/simple-v0"
    assert cell["reference"] == {"min": 0.0, "max": 1000.0,
                                 "source": "dataset mujoco/hopper/simple-v0"}
    assert all(abs(e["score"] - e["ret"] / 10) < 1e-9 for e in cell["episodes"])
    capsys.readouterr()
    assert main(["train", "--task", "walker2d-medium", "--dataset", "mujoco/hopper/simple-v0",
                 "--steps", "1", "--out", str(tmp_path / "w.pt")]) == 2
    assert "collected on Hopper-v5, not on Walker2d-v5" in capsys.readouterr().err
    minari.delete_dataset("mujoco/hopper/simple-v0")
