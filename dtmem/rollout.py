"""The batched rollout engine: E episode slots in lockstep, one batched model call per step.

Episode i is always reset with env seed `seed + i`, whatever the slot count or policy,
so every policy meets the same initial states (common random numbers). When an episode
ends its slot is cleared and takes the next episode, or idles once none are left.
"""

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm import tqdm

from dtmem.files import provenance, sha256
from dtmem.memory import make_policy
from dtmem.model import DecisionTransformer
from dtmem.stats import bootstrap_ci
from dtmem.tasks import Task, make_env


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


def rollout(model: DecisionTransformer, state_mean, state_std, task: Task, policy="recompute",
            episodes=10, slots=None, seed=0, target_return=None, progress=False, budget=None,
            ratio=None, memory=None, seeds=None):
    """Run `episodes` episodes with memory policy `policy` (at a token `budget` or a
    `ratio` of the tokens seen, for policies that take one) in min(slots, episodes) slots.
    memory: an already made MemoryPolicy to use instead (e.g. a NAMM with per-slot
    parameters during evolution). seeds: env seed of each episode (default seed + i).
    Returns (list of EpisodeResult in episode order, number of env steps taken)."""
    device = next(model.parameters()).device
    cfg = model.cfg
    E = min(slots or episodes, episodes)
    K, T = cfg.context_steps, task.max_episode_steps
    target = task.target_return if target_return is None else target_return
    mean = torch.as_tensor(state_mean, dtype=torch.float32, device=device)
    std = torch.as_tensor(state_std, dtype=torch.float32, device=device)
    envs = [make_env(task) for _ in range(E)]
    low, high = envs[0].action_space.low, envs[0].action_space.high

    recompute = policy == "recompute"
    if recompute:
        # Histories of every slot, for re-running the last K steps at each step.
        hist_states = torch.zeros(E, T, cfg.state_dim, device=device)
        hist_actions = torch.zeros(E, T, cfg.act_dim, device=device)
        hist_rtg = torch.zeros(E, T, 1, device=device)
    else:
        memory = memory or make_policy(policy, K, 3 * T, budget, ratio)
        cache = model.new_cache(E, memory.capacity(), device)
        memory.prepare(cache)

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
        episode[slot] = next_episode
        next_episode += 1
        t[slot], rtg[slot], ret[slot] = 0, target / task.return_scale, 0.0
        prev_action[slot] = 0.0
        token_sum[slot], token_max[slot] = 0, 0

    for slot in range(E):
        start(slot)
    bar = tqdm(total=episodes, desc=f"{task.name} {policy}", unit="ep", disable=not progress)
    with torch.inference_mode():  # like no_grad, minus autograd's per-op bookkeeping
        while (episode >= 0).any():
            active_np = episode >= 0
            active = torch.from_numpy(active_np).to(device)
            state = (torch.from_numpy(obs).to(device) - mean) / std
            rtg_now = torch.from_numpy(rtg[:, None]).float().to(device)
            t_now = torch.from_numpy(t).to(device)
            if recompute:
                actions, tokens = _recompute_step(model, hist_states, hist_actions, hist_rtg,
                                                  state, rtg_now, t_now, K)
            else:
                actions, attention = model.decode(cache, prev_action, rtg_now, state, t_now,
                                                  active, want_attention=memory.needs_attention)
                tokens = cache.held().T  # [E, L], before this step's eviction
                memory.after_step(cache, t_now, attention)
            tokens = tokens.cpu().numpy().reshape(len(episode), -1)  # [E, L] (recompute: 1)
            token_sum[active_np] += tokens[active_np]
            token_max[active_np] = np.maximum(token_max[active_np], tokens[active_np])
            actions_np = np.clip(actions.cpu().numpy(), low, high)
            finished = []
            for slot in np.flatnonzero(active_np):
                obs[slot], reward, terminated, truncated, _ = envs[slot].step(actions_np[slot])
                env_steps += 1
                ret[slot] += reward
                rtg[slot] -= reward / task.return_scale
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
                if not recompute:
                    cache.reset(torch.tensor([slot], device=device))
                    memory.reset(torch.tensor([slot], device=device))
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
                if recompute:
                    hist_states, hist_actions, hist_rtg = (
                        h[index] for h in (hist_states, hist_actions, hist_rtg))
                else:
                    cache.keep_slots(index)
                    memory.keep_slots(index)
    bar.close()
    return [results[i] for i in range(episodes)], env_steps


def _recompute_step(model, hist_states, hist_actions, hist_rtg, state, rtg, t, K):
    """The field's standard evaluation: a full forward over the last K steps of every
    slot (right-padded, so causal attention alone hides padding). Records the current
    step in the histories. Returns (actions [E, A], tokens attended [E])."""
    E = state.shape[0]
    rows = torch.arange(E, device=state.device)
    last = t.clamp(max=hist_states.shape[1] - 1)
    hist_states[rows, last] = state
    hist_rtg[rows, last] = rtg
    length = (t + 1).clamp(max=K)  # steps in each slot's window
    first = t + 1 - length
    step = first[:, None] + torch.arange(K, device=state.device)  # [E, K]
    inside = step <= t[:, None]
    index = torch.where(inside, step, last[:, None])
    pick = lambda h: h[rows[:, None], index] * inside[..., None]  # noqa: E731
    preds = model(pick(hist_rtg), pick(hist_states), pick(hist_actions), index * inside)
    actions = preds[rows, length - 1]  # [E, A]
    hist_actions[rows, last] = actions
    return actions, (3 * length - 1)[:, None].expand(-1, model.cfg.n_layer)


def summarize(results):
    """Mean, 95% bootstrap CI and token counts over episodes."""
    scores = np.array([r.score for r in results])
    returns = np.array([r.ret for r in results])
    lo, hi = bootstrap_ci(scores)
    return {
        "episodes": len(results),
        "mean_return": float(returns.mean()),
        "mean_score": float(scores.mean()),
        "score_ci95": [lo, hi],
        "mean_length": float(np.mean([r.length for r in results])),
        "mean_tokens": float(np.mean([r.mean_tokens for r in results])),
        "max_tokens": int(max(r.max_tokens for r in results)),
        "layer_mean_tokens": np.mean([r.layer_mean_tokens for r in results], 0).round(2).tolist(),
        "layer_max_tokens": np.max([r.layer_max_tokens for r in results], 0).tolist(),
    }


def results_file(results, summary, **context):
    return {**context, "summary": summary, "episodes": [asdict(r) for r in results]}


def rollout_cell(model, payload, checkpoint, task: Task, policy, episodes, seed=0, slots=None,
                 target_return=None, budget=None, ratio=None, namm_file=None, progress=True,
                 label=None):
    """One results file (a cell of the experiment, `dtmem rollout --json`): every episode
    with its env seed, the summary, and what made them (checkpoint and NAMM hashes,
    references, target return, provenance). label names the cell in reports when the
    policy and budget alone do not (e.g. a zero-shot and a local NAMM)."""
    memory = None
    if namm_file is not None:
        memory = make_policy(policy, model.cfg.context_steps, 3 * task.max_episode_steps,
                             budget, ratio, namm_file=namm_file)
    results, _, wall = timed_rollout(model, payload["state_mean"], payload["state_std"], task,
                                     policy, episodes, slots, seed, target_return,
                                     progress=progress, budget=budget, ratio=ratio,
                                     memory=memory)
    return results_file(
        results, summarize(results), task=task.name, policy=policy, label=label,
        checkpoint=str(checkpoint), checkpoint_sha256=sha256(checkpoint), budget=budget,
        ratio=ratio, namm=namm_file and str(namm_file),
        namm_sha256=namm_file and sha256(namm_file),
        namm_sources=memory and sorted({t for stage in memory.meta.get("stages", [])
                                        for t in stage}),
        checkpoint_task=payload["task"], dataset_id=payload["dataset_id"],
        checkpoint_steps=payload["steps"],
        target_return=task.target_return if target_return is None else target_return,
        seed=seed, reference={"min": task.ref_min, "max": task.ref_max,
                              "source": task.ref_source},
        provenance=provenance(wall_seconds=round(wall, 2)))


def timed_rollout(*args, **kwargs):
    """rollout plus its wall time in seconds."""
    begin = time.perf_counter()
    results, env_steps = rollout(*args, **kwargs)
    return results, env_steps, time.perf_counter() - begin
