"""Behaviour policies that generate offline datasets, runnable with numpy alone.

Policies are trained elsewhere (dtmem/ppo.py, with Stable-Baselines3)
and exported to a plain .npz so that collecting data never needs torch or SB3,
and loading a policy file never executes code from it.
"""

from __future__ import annotations

import json
import os
import zipfile
from typing import Protocol

import numpy as np

from dtmem.errors import UserError
from dtmem.files import atomic_path


class BehaviorPolicy(Protocol):
    """Batched: obs [N, obs_dim] float64 -> actions [N, act_dim] float32 within the action bounds."""

    def act(self, obs: np.ndarray, rng: np.random.Generator) -> np.ndarray: ...


class RandomPolicy:
    """Uniform random actions: the lowest-quality dataset and a baseline for normalised scores."""

    def __init__(self, low: np.ndarray, high: np.ndarray):
        self.low = np.asarray(low, dtype=np.float32)
        self.high = np.asarray(high, dtype=np.float32)

    def act(self, obs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        n = np.asarray(obs).shape[0]
        a = rng.uniform(self.low, self.high, size=(n, self.low.shape[0]))
        return a.astype(np.float32)


ACTIVATIONS = {
    "relu": lambda x: np.maximum(x, 0.0),
    "tanh": np.tanh,
}


class MLPPolicy:
    """Gaussian MLP policy: normalise obs, hidden layers, linear mean head, state-independent log_std.

    Mirrors SB3's VecNormalize + ActorCriticPolicy (Box actions, no squashing), so an
    exported PPO actor gives the same actions as SB3's predict(). Weights are stored
    as [in, out] so a layer is x @ w + b. Computation is in float64 for reproducibility.
    """

    def __init__(
        self,
        weights: list[tuple[np.ndarray, np.ndarray]],  # hidden layers, then the mean head
        log_std: np.ndarray,
        obs_mean: np.ndarray,
        obs_var: np.ndarray,
        action_low: np.ndarray,
        action_high: np.ndarray,
        activation: str = "relu",
        obs_clip: float = 10.0,
        obs_eps: float = 1e-8,
        meta: dict | None = None,
        deterministic: bool = False,
    ):
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}, expected one of {sorted(ACTIVATIONS)}")
        self.weights = [(np.asarray(w, np.float64), np.asarray(b, np.float64)) for w, b in weights]
        self.log_std = np.asarray(log_std, np.float64)
        self.obs_mean = np.asarray(obs_mean, np.float64)
        self.obs_var = np.asarray(obs_var, np.float64)
        self.action_low = np.asarray(action_low, np.float32)
        self.action_high = np.asarray(action_high, np.float32)
        self.activation = activation
        self.obs_clip = float(obs_clip)
        self.obs_eps = float(obs_eps)
        self.meta = dict(meta or {})
        self.deterministic = deterministic

    @property
    def obs_dim(self) -> int:
        return self.weights[0][0].shape[0]

    @property
    def act_dim(self) -> int:
        return self.weights[-1][0].shape[1]

    def mean(self, obs: np.ndarray) -> np.ndarray:
        """Unclipped action mean for raw (unnormalised) observations, float64."""
        obs = np.asarray(obs, np.float64)
        if obs.ndim != 2 or obs.shape[1] != self.obs_dim:
            raise ValueError(f"expected obs of shape [N, {self.obs_dim}], got {obs.shape}")
        # Same formula as VecNormalize.normalize_obs: the net was trained on these inputs.
        x = np.clip((obs - self.obs_mean) / np.sqrt(self.obs_var + self.obs_eps), -self.obs_clip, self.obs_clip)
        f = ACTIVATIONS[self.activation]
        for w, b in self.weights[:-1]:
            x = f(x @ w + b)
        w, b = self.weights[-1]
        return x @ w + b

    def act(self, obs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        a = self.mean(obs)
        if not self.deterministic:
            a = a + np.exp(self.log_std) * rng.standard_normal(a.shape)
        # SB3 clips sampled actions to the bounds before stepping the env; do the same.
        return np.clip(a, self.action_low, self.action_high).astype(np.float32)

    def save(self, path: str | os.PathLike) -> None:
        """Write an .npz atomically: readers never see a half-written file."""
        path = os.fspath(path)
        arrays = {
            "obs_mean": self.obs_mean,
            "obs_var": self.obs_var,
            "obs_clip": np.array(self.obs_clip),
            "obs_eps": np.array(self.obs_eps),
            "log_std": self.log_std,
            "action_low": self.action_low,
            "action_high": self.action_high,
            "meta": np.array(json.dumps({**self.meta, "activation": self.activation})),
        }
        for i, (w, b) in enumerate(self.weights):
            arrays[f"w{i}"], arrays[f"b{i}"] = w, b
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike, deterministic: bool = False) -> MLPPolicy:
        path = os.fspath(path)
        fix = "re-export it with scripts/train_behavior.py or pass another policy file"
        if not os.path.isfile(path):
            raise UserError(f"policy file {path} not found: check the path or train one with scripts/train_behavior.py")
        if not zipfile.is_zipfile(path):  # else np.load would try it as a pickle and suggest unsafe loading
            raise UserError(f"policy file {path} is not an .npz archive (corrupt or wrong file): {fix}")
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise UserError(f"policy file {path} is not a readable .npz ({e}): {fix}") from None
        required = ["obs_mean", "obs_var", "obs_clip", "obs_eps", "log_std", "action_low", "action_high", "meta", "w0", "b0"]
        missing = [k for k in required if k not in data]
        if missing:
            raise UserError(f"policy file {path} lacks arrays {', '.join(missing)}: {fix}")
        weights = []
        while f"w{len(weights)}" in data:
            i = len(weights)
            if f"b{i}" not in data:
                raise UserError(f"policy file {path} has w{i} but no b{i}: {fix}")
            weights.append((data[f"w{i}"], data[f"b{i}"]))
        try:
            meta = json.loads(str(data["meta"]))
            activation = meta["activation"]
            dims = [weights[0][0].shape[0]] + [w.shape[1] for w, _ in weights]
            ok = all(w.shape == (dims[i], dims[i + 1]) and b.shape == (dims[i + 1],) for i, (w, b) in enumerate(weights))
            ok = ok and data["obs_mean"].shape == data["obs_var"].shape == (dims[0],)
            ok = ok and data["log_std"].shape == data["action_low"].shape == data["action_high"].shape == (dims[-1],)
            if not ok:
                raise ValueError("array shapes do not fit together")
            return cls(
                weights=weights,
                log_std=data["log_std"],
                obs_mean=data["obs_mean"],
                obs_var=data["obs_var"],
                action_low=data["action_low"],
                action_high=data["action_high"],
                activation=activation,
                obs_clip=float(data["obs_clip"]),
                obs_eps=float(data["obs_eps"]),
                meta=meta,
                deterministic=deterministic,
            )
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            raise UserError(f"policy file {path} is malformed ({e}): {fix}") from None
