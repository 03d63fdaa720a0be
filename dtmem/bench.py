"""`dtmem bench rollout`: rollout throughput side by side, as ratios from one run.

The floor is pure env stepping: the same envs, the same slot count and exactly the same
number of steps per episode as the rollout it is compared with, with random actions.
"""

import multiprocessing
import resource
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch

from dtmem.memory import POLICIES, make_policy
from dtmem.memory.namm import DEFAULT_N_UP
from dtmem.namm import DEFAULT_FILES, SHIPPED_DIR
from dtmem.rollout import timed_rollout
from dtmem.tasks import Task, make_env


def env_floor(task: Task, lengths, n_slots, seed=0):
    """Seconds to make n_slots envs and step them in lockstep through episodes of the
    given lengths (a rollout makes its envs too, so both sides of the ratio include it)."""
    begin = time.perf_counter()
    envs = [make_env(task) for _ in range(n_slots)]
    rng = np.random.default_rng(seed)
    queue = list(lengths)
    left = [0] * n_slots
    for slot in range(n_slots):
        envs[slot].reset(seed=seed + slot)
        left[slot] = queue.pop(0)
    while any(left):
        actions = rng.uniform(-1, 1, size=(n_slots,) + envs[0].action_space.shape)
        for slot in range(n_slots):
            if not left[slot]:
                continue
            _, _, terminated, truncated, _ = envs[slot].step(actions[slot].astype(np.float32))
            left[slot] -= 1
            if terminated or truncated:  # a random policy falls early: start over, same count
                envs[slot].reset()
            if not left[slot] and queue:
                envs[slot].reset()
                left[slot] = queue.pop(0)
    return time.perf_counter() - begin


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _measure(model, state_mean, state_std, task, policy, slots, threads):
    torch.set_num_threads(threads)
    memory = None
    if policy in DEFAULT_FILES and (SHIPPED_DIR / DEFAULT_FILES[policy]).exists():
        # A NAMM's cost depends on how much it keeps: time the shipped one, not the
        # all-zero network (which keeps everything) used where none ships.
        memory = make_policy(policy, model.cfg.context_steps, 3 * task.max_episode_steps,
                             namm_file=SHIPPED_DIR / DEFAULT_FILES[policy])
    results, steps, wall = timed_rollout(model, state_mean, state_std, task, policy,
                                         episodes=slots, slots=slots, seed=0, memory=memory)
    floor = env_floor(task, [r.length for r in results], slots)
    return steps, wall, floor, peak_rss_mib()


def rollout_configs(slot_counts=(1, 16, 64)):
    """`dtmem bench rollout`: the field's loop against cached decoding at several widths."""
    return [("recompute", 1)] + [(p, n) for p in ("window", "full") for n in slot_counts]


def memory_configs(slot_counts=(32, 64)):
    """`dtmem bench memory`: every cache policy at the same widths as `full`."""
    return [(p, n) for n in slot_counts for p in ["full", *sorted(set(POLICIES) - {"full"})]]


def run_bench(model, state_mean, state_std, task: Task, configs):
    """Rows of (policy, slots, env steps, seconds, floor seconds, peak MiB), one per
    (policy, slots) config. Each row runs in a fresh process, so that its peak memory is
    its own; policies with a budget keep their default (3K tokens)."""
    rows = []
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn, max_tasks_per_child=1) as pool:
        for policy, slots in configs:
            rows.append((policy, slots, *pool.submit(
                _measure, model, state_mean, state_std, task, policy, slots,
                torch.get_num_threads()).result()))
    return rows


def print_bench(rows, cache_bytes):
    base = rows[0][2] / rows[0][3]  # recompute at batch 1, episode-steps per second
    print(f"{'policy':10} {'slots':>5} {'steps':>7} {'steps/s':>9} {'x recompute@1':>14} "
          f"{'wall / env floor':>17} {'peak MiB':>9}")
    for policy, slots, steps, wall, floor, peak in rows:
        rate = steps / wall
        print(f"{policy:10} {slots:5d} {steps:7d} {rate:9.0f} {rate / base:14.1f} "
              f"{wall / floor:17.2f} {peak:9.0f}")
    _, slots, steps, _, floor, _ = max(rows, key=lambda row: row[1])
    print(f"(env floor alone, {slots} slots: {steps / floor:.0f} steps/s = "
          f"{steps / floor / base:.1f}x recompute@1, the most any policy can reach here)")
    print(f"(peak MiB: resident memory of the process that ran the row; a whole-episode "
          f"cache for {max(r[1] for r in rows)} slots holds {cache_bytes / 2**20:.0f} MiB of "
          "keys and values)")


def print_memory_bench(rows):
    # Per env step: policies change how long episodes last, so whole-run times would mix
    # the cost of a policy with the length of the episodes it produces.
    full = {slots: wall / steps for policy, slots, steps, wall, _, _ in rows if policy == "full"}
    print(f"{'policy':10} {'slots':>5} {'steps/s':>9} {'time per step / full':>21} "
          f"{'peak MiB':>9}")
    for policy, slots, steps, wall, _, peak in rows:
        print(f"{policy:10} {slots:5d} {steps / wall:9.0f} "
              f"{wall / steps / full[slots]:21.2f} {peak:9.0f}")
    for policy, name in DEFAULT_FILES.items():
        shipped = (SHIPPED_DIR / name).exists()
        print(f"({policy}: " + (f"the shipped data/namm/{name})" if shipped else
                                "no NAMM ships, so the all-zero network, which keeps every "
                                "token: its worst case)"))


def cache_bytes(model, slots, tokens):
    cfg = model.cfg
    return 2 * cfg.n_layer * slots * tokens * cfg.n_embd * torch.finfo(torch.float32).bits // 8


def bench_generation(model, state_mean, state_std, task: Task, population=32, episodes=2,
                     scorer="bam", n_up=DEFAULT_N_UP):
    """Wall time of one evolution generation (every member in one batched rollout, members
    drawn as CMA-ES draws its first generation) and the env floor of the same episodes."""
    from dtmem.evolve import _evaluate_task
    from dtmem.namm import SCORER_POLICIES, SCORERS

    payload = {"state_mean": state_mean, "state_std": state_std}
    policy = SCORER_POLICIES[scorer]
    zero = np.zeros((1, SCORERS[scorer][1]))
    _, _, stats = _evaluate_task(task, model, payload, policy, n_up, None, zero, 1, 0)
    members = np.random.default_rng(0).normal(0, 0.065, (population, SCORERS[scorer][1]))
    begin = time.perf_counter()
    _, results, _ = _evaluate_task(task, model, payload, policy, n_up, stats, members,
                                   episodes, 1000)
    wall = time.perf_counter() - begin
    return wall, env_floor(task, [r.length for r in results], population * episodes), results
