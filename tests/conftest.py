"""Shared fixtures: a real Hopper-v5 dataset built into a temporary Minari root, and a
small DT trained on it. Built once per test session."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def minari_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("minari")
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(root)
    yield root
    if old is None:
        del os.environ["MINARI_DATASETS_PATH"]
    else:
        os.environ["MINARI_DATASETS_PATH"] = old


@pytest.fixture(scope="session")
def hopper_dataset(minari_root):
    from dtmem.data import build_dataset
    from dtmem.tasks import resolve_task

    task = resolve_task("hopper")
    return build_dataset(task, "medium", steps=3000, seed=0, n_envs=8, progress=False)


@pytest.fixture(scope="session")
def checkpoint(hopper_dataset, tmp_path_factory):
    """A tiny DT (2 layers, 32 wide) trained for a few steps: fast, and real."""
    from dtmem.train import TrainConfig, train

    path = tmp_path_factory.mktemp("ckpt") / "hopper.pt"
    cfg = TrainConfig(task="hopper-medium", steps=30, batch_size=16, n_layer=2, n_embd=32,
                      eval_every=0, eval_episodes=2, checkpoint_every=10, warmup_steps=10)
    train(cfg, path, progress=False)
    return path


@pytest.fixture
def shipped(tmp_path, monkeypatch, checkpoint):
    """A folder of shipped DTs holding the test DT as hopper-medium's, in place of
    data/checkpoints/ (checkpoints.SHIPPED_DIR is the one place that knows it)."""
    import shutil

    from dtmem import checkpoints

    folder = tmp_path / "shipped"
    folder.mkdir()
    shutil.copy(checkpoint, folder / "hopper-medium.pt")
    monkeypatch.setattr(checkpoints, "SHIPPED_DIR", folder)
    return folder
