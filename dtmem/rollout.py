"""The batched rollout engine: E episode slots in lockstep, one batched model call per step.

Episode i is always reset with env seed `seed + i`, whatever the slot count or policy,
so every policy meets the same initial states (common random numbers). When an episode
ends its slot is cleared and takes the next episode, or idles once none are left.
Two decoders run the model: KV-cached decoding under a memory policy, and `recompute`,
the field's standard (a full forward over the last K steps at every env step).

With shards > 1 the episodes are split into that many contiguous blocks, each its own
batched rollout: a job of a backend (dtmem/backend.py), so that 2 worker processes use 2
cores, each stepping its envs while the other decodes. Which episodes share a batch
changes the floats (batched matmuls round differently at other batch sizes), so the
shards are part of a run, like its seed; the workers are not: 2 shards give the same
numbers on 1 worker as on 2.
"""

import copy
from dataclasses import dataclass, replace

import numpy as np
import torch

from dtmem.backend import LocalBackend
from dtmem.errors import UserError
from dtmem.limits import check_memory, check_seeds, check_value
from dtmem.memory import MemoryPolicy
from dtmem.model import DecisionTransformer
from dtmem.runtime import progress_bar
from dtmem.tasks import Task, make_env
from dtmem.video import FRAME_SIZE


@dataclass
class EpisodeResult:
    episode: int
    seed: int
    ret: float
    length: int
    score: float  # normalised, 100 = the task's ref_max
    mean_tokens: float  # tokens the state query attended to, mean over steps and layers
    max_tokens: int  # the most tokens any layer held at any step
    layer_mean_tokens: list  # per layer: mean over steps
    layer_max_tokens: list  # per layer: max over steps


class CachedDecoder:
    """One decode step per env step on a KV cache; the memory policy then evicts."""

    def __init__(self, model, policy: MemoryPolicy, n_slots, device):
        self.model, self.policy = model, policy
        self.cache = model.new_cache(n_slots, policy.capacity(), device)
        policy.prepare(self.cache)

    def step(self, prev_action, rtg, state, t, active):
        """(actions [E, A], tokens attended [E, L])."""
        actions, attention = self.model.decode(self.cache, prev_action, rtg, state, t, active,
                                               want_attention=self.policy.needs_attention)
        tokens = self.cache.held().T  # before this step's eviction
        self.policy.after_step(self.cache, t, attention)
        return actions, tokens

    def reset(self, slots):
        self.cache.reset(slots)
        self.policy.reset(slots)

    def keep_slots(self, index):
        self.cache.keep_slots(index)
        self.policy.keep_slots(index)


class RecomputeDecoder:
    """The field's standard evaluation: every slot's histories, and at each env step a full
    forward over its last K steps (right-padded, so causal attention alone hides padding)."""

    def __init__(self, model, n_slots, max_steps, device):
        cfg = model.cfg
        self.model, self.K = model, cfg.context_steps
        self.states = torch.zeros(n_slots, max_steps, cfg.state_dim, device=device)
        self.actions = torch.zeros(n_slots, max_steps, cfg.act_dim, device=device)
        self.rtg = torch.zeros(n_slots, max_steps, 1, device=device)

    def step(self, prev_action, rtg, state, t, active):
        """Records the current step in the histories; (actions [E, A], tokens [E, L])."""
        E = state.shape[0]
        rows = torch.arange(E, device=state.device)
        last = t.clamp(max=self.states.shape[1] - 1)
        self.states[rows, last] = state
        self.rtg[rows, last] = rtg
        length = (t + 1).clamp(max=self.K)  # steps in each slot's window
        first = t + 1 - length
        step = first[:, None] + torch.arange(self.K, device=state.device)  # [E, K]
        inside = step <= t[:, None]
        index = torch.where(inside, step, last[:, None])
        pick = lambda h: h[rows[:, None], index] * inside[..., None]  # noqa: E731
        preds = self.model(pick(self.rtg), pick(self.states), pick(self.actions),
                           index * inside)
        actions = preds[rows, length - 1]  # [E, A]
        self.actions[rows, last] = actions
        return actions, (3 * length - 1)[:, None].expand(-1, self.model.cfg.n_layer)

    def reset(self, slots):
        """Nothing to clear: a restarted slot overwrites its history from step 0 on."""

    def keep_slots(self, index):
        self.states, self.actions, self.rtg = (h[index] for h in
                                               (self.states, self.actions, self.rtg))


def rollout(model: DecisionTransformer, state_mean, state_std, task: Task,
            policy: MemoryPolicy, episodes=10, slots=None, seed=0, target_return=None,
            progress=False, seeds=None, video=None, shards=1, backend=None):
    """Run `episodes` episodes under memory `policy` in min(slots, episodes) slots.
    seeds: env seed of each episode (default seed + i). video: a VideoRecorder for the
    first episodes (dtmem/video.py). shards: batched rollouts of contiguous episode blocks,
    the slots shared out among them, run as jobs of `backend` (default: this process).
    Returns (list of EpisodeResult in episode order, number of env steps taken)."""
    device = next(model.parameters()).device
    cfg = model.cfg
    check_value("episodes", episodes)
    if slots is not None:
        check_value("slots", slots)
    if seeds is None:
        check_seeds(seed, episodes)
    if target_return is not None:
        check_value("target_return", target_return)
    if shards != 1:
        return _sharded(model, state_mean, state_std, task, policy, episodes, slots, seed,
                        target_return, progress, seeds, video, shards, backend)
    E = min(slots or episodes, episodes)
    # Keys and values of a whole cache at its largest, doubled for policies' token state.
    check_memory(2 * E * policy.capacity() * cfg.n_layer * 2 * cfg.n_embd * 4,
                 f"a KV cache of {E} slots x {policy.capacity()} tokens",
                 "run fewer episodes at once with --slots")
    T = task.max_episode_steps
    target = task.target_return if target_return is None else target_return
    mean = torch.as_tensor(state_mean, dtype=torch.float32, device=device)
    std = torch.as_tensor(state_std, dtype=torch.float32, device=device)
    envs = [make_env(task, video and FRAME_SIZE) for _ in range(E)]
    low, high = envs[0].action_space.low, envs[0].action_space.high
    decoder = (CachedDecoder(model, policy, E, device) if policy.uses_cache
               else RecomputeDecoder(model, E, T, device))

    # Per-slot bookkeeping lives in numpy (cheap scalar updates); the model gets tensors.
    episode = np.full(E, -1)  # episode index in each slot, -1 when idle
    t = np.zeros(E, dtype=np.int64)
    rtg = np.zeros(E)
    obs = np.zeros((E, cfg.state_dim), dtype=np.float32)
    prev_action = torch.zeros(E, cfg.act_dim, device=device)
    ret = np.zeros(E)
    token_sum, token_max = np.zeros((E, cfg.n_layer)), np.zeros((E, cfg.n_layer))
    results, next_episode, env_steps = {}, 0, 0

    def episode_seed(i):
        return seed + i if seeds is None else int(seeds[i])

    def start(slot):
        nonlocal next_episode
        obs[slot], _ = envs[slot].reset(seed=episode_seed(next_episode))
        if video:
            video.capture(next_episode, envs[slot])
        episode[slot] = next_episode
        next_episode += 1
        t[slot], rtg[slot], ret[slot] = 0, target / task.return_scale, 0.0
        prev_action[slot] = 0.0
        token_sum[slot], token_max[slot] = 0, 0

    for slot in range(E):
        start(slot)
    bar = progress_bar(total=episodes, desc=f"{task.name} {policy.name}", unit="ep",
                       show=progress)
    with torch.inference_mode():  # like no_grad, minus autograd's per-op bookkeeping
        while (episode >= 0).any():
            active_np = episode >= 0
            active = torch.from_numpy(active_np).to(device)
            state = (torch.from_numpy(obs).to(device) - mean) / std
            rtg_now = torch.from_numpy(rtg[:, None]).float().to(device)
            t_now = torch.from_numpy(t).to(device)
            actions, tokens = decoder.step(prev_action, rtg_now, state, t_now, active)
            tokens = tokens.cpu().numpy()  # [E, L]
            token_sum[active_np] += tokens[active_np]
            token_max[active_np] = np.maximum(token_max[active_np], tokens[active_np])
            actions_np = np.clip(actions.cpu().numpy(), low, high)
            finished = []
            for slot in np.flatnonzero(active_np):
                obs[slot], reward, terminated, truncated, _ = envs[slot].step(actions_np[slot])
                env_steps += 1
                ret[slot] += reward
                rtg[slot] -= reward / task.return_scale
                if video:
                    video.capture(int(episode[slot]), envs[slot])
                if terminated or truncated:
                    finished.append(slot)
            prev_action.copy_(actions)
            t[active_np] += 1
            for slot in finished:
                i = int(episode[slot])
                length = int(t[slot])
                results[i] = EpisodeResult(
                    episode=i, seed=episode_seed(i), ret=float(ret[slot]), length=length,
                    score=float(task.normalise(ret[slot])),
                    mean_tokens=float(token_sum[slot].mean() / length),
                    max_tokens=int(token_max[slot].max()),
                    layer_mean_tokens=(token_sum[slot] / length).round(2).tolist(),
                    layer_max_tokens=token_max[slot].astype(int).tolist())
                bar.update(1)
                if video:
                    video.finish(i, results[i], envs[slot])
                decoder.reset(torch.tensor([slot], device=device))
                if next_episode < episodes:
                    start(slot)
                else:
                    episode[slot] = -1
            idle = episode < 0
            if next_episode >= episodes and 4 * idle.sum() >= len(idle) and not idle.all():
                # No episode waits for a slot: drop the finished ones (renumbering the rest)
                # so that they stop costing compute. Shrinking only when a quarter is idle
                # keeps the copies few.
                keep = np.flatnonzero(~idle)
                envs = [envs[slot] for slot in keep]
                episode, t, rtg, obs, ret, token_sum, token_max = (
                    a[keep] for a in (episode, t, rtg, obs, ret, token_sum, token_max))
                index = torch.from_numpy(keep).to(device)
                prev_action = prev_action[index]
                decoder.keep_slots(index)
    bar.close()
    return [results[i] for i in range(episodes)], env_steps


def _sharded(model, state_mean, state_std, task, policy, episodes, slots, seed,
             target_return, progress, seeds, video, shards, backend):
    """rollout() in `shards` jobs: each a contiguous block of the episodes, in order."""
    if not (isinstance(shards, int) and 1 <= shards <= episodes):
        raise UserError(f"--shards must be an integer from 1 to the episodes ({episodes}), "
                        f"got {shards!r}")
    if video:
        raise UserError("--video films episodes in this process; drop --shards to film them")
    seeds = [seed + i for i in range(episodes)] if seeds is None else list(seeds)
    blocks = np.array_split(np.arange(episodes), shards)
    backend = backend or LocalBackend()
    jobs = [(model, state_mean, state_std, task, policy, [seeds[i] for i in block],
             slots and max(1, round(slots * len(block) / episodes)), target_return,
             progress and backend.in_process) for block in blocks]
    outcomes = backend.map(_rollout_shard, jobs)
    results = [replace(r, episode=int(block[0]) + r.episode)
               for block, (shard, _) in zip(blocks, outcomes) for r in shard]
    return results, sum(steps for _, steps in outcomes)


def _rollout_shard(model, state_mean, state_std, task, policy, seeds, slots, target_return,
                   progress):
    """One shard: a backend's job, module-level so that worker processes can import it; on
    one torch thread (the fastest for a rollout's many small ops, and the same in every
    process) and on its own copy of the policy (a policy holds its slots' state)."""
    torch.set_num_threads(1)
    return rollout(model, state_mean, state_std, task, copy.deepcopy(policy), len(seeds),
                   slots, target_return=target_return, progress=progress, seeds=seeds)
