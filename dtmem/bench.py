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

from dtmem.backend import LocalBackend
from dtmem.checkpoints import Checkpoint, shipped_path
from dtmem.errors import UserError
from dtmem.evolve import EvolveConfig, _evaluate_task, shards_of
from dtmem.memory import POLICIES, PolicySpec
from dtmem.memory.namm import DEFAULT_N_UP, policy_for_scorer
from dtmem.memory.namm.scorers import SCORERS
from dtmem.results import build_policy
from dtmem.rollout import rollout
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


def bench_checkpoint(task: Task, path=None, device="cpu"):
    """The DT to time: --checkpoint, else the task's shipped one, else an untrained DT of
    the default size (speed does not depend on the weights, only on episode lengths)."""
    if path or shipped_path(task.name).exists():
        return Checkpoint.for_task(task, path, device)
    return Checkpoint.untrained(task, device)


def _measure(checkpoint, task, policy, slots, threads):
    torch.set_num_threads(threads)
    begin = time.perf_counter()
    results, steps = rollout(checkpoint.model, checkpoint.state_mean, checkpoint.state_std,
                             task, policy, episodes=slots, slots=slots, seed=0)
    wall = time.perf_counter() - begin
    floor = env_floor(task, [r.length for r in results], slots)
    return steps, wall, floor, peak_rss_mib()


def rollout_configs(slot_counts=(1, 16, 64)):
    """`dtmem bench rollout`: the field's loop against cached decoding at several widths."""
    return [("recompute", 1)] + [(p, n) for p in ("window", "full") for n in slot_counts]


def memory_configs(slot_counts=(32, 64)):
    """`dtmem bench memory`: every cache policy at the same widths as `full`."""
    return [(p, n) for n in slot_counts for p in ["full", *sorted(set(POLICIES) - {"full"})]]


def run_bench(checkpoint, task: Task, configs):
    """Rows of (policy, slots, env steps, seconds, floor seconds, peak MiB), one per
    (policy, slots) config. Each row runs in a fresh process, so that its peak memory is
    its own; policies with a budget keep their default (3K tokens), NAMMs run their
    shipped file (a NAMM's cost depends on how much it keeps) and are skipped without one."""
    rows = []
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn, max_tasks_per_child=1) as pool:
        for name, slots in configs:
            try:
                policy = build_policy(PolicySpec(name), checkpoint, task)
            except UserError as e:
                print(f"({name}: skipped, {e})")
                continue
            print(f"timing {name} at {slots} slots on {task.name}", flush=True)
            rows.append((name, slots, *pool.submit(
                _measure, checkpoint, task, policy, slots, torch.get_num_threads()).result()))
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


def bench_shards(checkpoint, task: Task, slots=64, shards=2):
    """`dtmem bench rollout`'s two cores: window at `slots` slots in `shards` shards, in
    turn in this process and on as many worker processes (started, and warmed by a
    one-episode rollout each, before the clock), against the single-core env floor of the
    same episodes. Returns (seconds in turn, seconds on workers, floor, identical)."""
    policy = build_policy(PolicySpec("window"), checkpoint, task)
    model = checkpoint.model, checkpoint.state_mean, checkpoint.state_std, task, policy
    walls, scores = [], []
    for workers in (1, shards):
        with LocalBackend(workers) as backend:
            rollout(*model, episodes=shards, shards=shards, backend=backend)
            begin = time.perf_counter()
            results, _ = rollout(*model, episodes=slots, shards=shards, backend=backend)
            walls.append(time.perf_counter() - begin)
            scores.append([r.score for r in results])
    floor = env_floor(task, [r.length for r in results], slots)
    return walls[0], walls[1], floor, scores[0] == scores[1]


def print_shards_bench(in_turn, on_workers, floor, identical, slots=64, shards=2):
    print(f"window at {slots} slots in {shards} shards: in turn in one process "
          f"{in_turn / floor:.2f}x the env floor; on {shards} worker processes "
          f"{on_workers / floor:.2f}x the single-core env floor (target at most 1.3); "
          f"scores identical: {'yes' if identical else 'NO'}")


def print_memory_bench(rows):
    # Per env step: policies change how long episodes last, so whole-run times would mix
    # the cost of a policy with the length of the episodes it produces.
    full = {slots: wall / steps for policy, slots, steps, wall, _, _ in rows if policy == "full"}
    print(f"{'policy':10} {'slots':>5} {'steps/s':>9} {'time per step / full':>21} "
          f"{'peak MiB':>9}")
    for policy, slots, steps, wall, _, peak in rows:
        print(f"{policy:10} {slots:5d} {steps / wall:9.0f} "
              f"{wall / steps / full[slots]:21.2f} {peak:9.0f}")


def cache_bytes(model, slots, tokens):
    cfg = model.cfg
    return 2 * cfg.n_layer * slots * tokens * cfg.n_embd * torch.finfo(torch.float32).bits // 8


def bench_generation(checkpoint, task: Task, population=EvolveConfig.population,
                     episodes=EvolveConfig.episodes, scorer="bam", n_up=DEFAULT_N_UP, workers=1,
                     shards=1):
    """Wall time of one evolution generation (members drawn as CMA-ES draws its first
    generation, in `shards` batched rollouts run by `workers` local processes) and the env
    floor of the same episodes. Population and episodes default to the recipe's own."""
    policy = policy_for_scorer(scorer)
    zero = np.zeros((1, SCORERS[scorer][1]))
    members = np.random.default_rng(0).normal(0, EvolveConfig.sigma,
                                              (population, SCORERS[scorer][1]))
    with LocalBackend(workers) as backend:
        # The statistics' rollout, once per worker: the workers start and import before the
        # timed generation, as they have in a run after its first generation.
        stats_job = (task, checkpoint, policy, n_up, None, zero, 1, 0)
        _, _, stats = backend.map(_evaluate_task, [stats_job] * workers)[0]
        jobs = [(task, checkpoint, policy, n_up, stats, block, episodes, 1000)
                for block in shards_of(members, shards)]
        begin = time.perf_counter()
        outcomes = backend.map(_evaluate_task, jobs)
        wall = time.perf_counter() - begin
    results = [r for _, shard, _ in outcomes for r in shard]
    return wall, env_floor(task, [r.length for r in results], population * episodes), results


def training_rates(cfg, batch_size=64, updates=20, seed=0, compiled=False):
    """`dtmem bench train`: updates per second of train.py's own update (train.update) for
    each variant, side by side in one run, on random windows of the real shapes (values do
    not change the arithmetic), after 3 warm-up updates (which compile, for the compiled
    variants); and the share of this CPU's measured float32 matmul rate that each reaches.
    Rows: (variant, updates/s, GFLOP/s)."""
    from dtmem.model import DecisionTransformer
    from dtmem.train import update

    B, K = batch_size, cfg.context_steps
    g = torch.Generator().manual_seed(seed)
    batch = {"rtg": torch.randn(B, K, 1, generator=g),
             "states": torch.randn(B, K, cfg.state_dim, generator=g),
             "actions": torch.rand(B, K, cfg.act_dim, generator=g) * 2 - 1,
             "timesteps": torch.randint(0, cfg.max_timestep, (B, K), generator=g),
             "mask": torch.ones(B, K)}
    # Matmul FLOPs of one update: forward 2 x (12 d^2 weights + 2 T d attention) per token
    # and layer, backward twice the forward.
    T, d = 3 * K, cfg.n_embd
    flops = 3 * 2 * cfg.n_layer * B * T * (12 * d * d + 2 * T * d)
    rows = []
    variants = [("fp32", False, False, False), ("fp32, fused AdamW", False, True, False),
                ("bf16 autocast", True, False, False), ("bf16, fused AdamW", True, True, False)]
    if compiled:  # the fastest eager variant, compiled
        variants.append(("bf16, fused, compile", True, True, True))
    for name, bf16, fused, compile_model in variants:
        torch.manual_seed(seed)
        model = DecisionTransformer(cfg).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4,
                                      fused=fused or None)
        forward = torch.compile(model) if compile_model else model
        for _ in range(3):
            update(forward, optimizer, batch, 0.25, bf16)
        begin = time.perf_counter()
        for _ in range(updates):
            update(forward, optimizer, batch, 0.25, bf16)
        rate = updates / (time.perf_counter() - begin)
        rows.append((name, rate, rate * flops / 1e9))
    return rows, matmul_gflops()


def print_data_loading(task: Task, cfg, batch_size=64, batches=200):
    """Milliseconds per batch of train.py's window sampler on the task's local dataset."""
    from dtmem.data import Episodes, WindowSampler, find_dataset

    try:
        dataset, dataset_id = find_dataset(task)
    except UserError:
        print(f"(data loading not timed: {task.name} has no local dataset)")
        return
    episodes = Episodes.from_minari(dataset)
    sampler = WindowSampler(episodes, cfg.context_steps, task.return_scale,
                            *episodes.state_stats())
    sampler.sample(batch_size)
    begin = time.perf_counter()
    for _ in range(batches):
        sampler.sample(batch_size)
    print(f"data loading: {(time.perf_counter() - begin) / batches * 1e3:.2f} ms per batch of "
          f"{batch_size} windows from {dataset_id}")


def matmul_gflops(n=512, seconds=0.5):
    """This CPU's float32 matmul rate at torch's current thread count, GFLOP/s."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    count, begin = 0, time.perf_counter()
    while time.perf_counter() - begin < seconds:
        torch.mm(a, b)
        count += 1
    return count * 2 * n**3 / (time.perf_counter() - begin) / 1e9


def print_training_rates(rows, peak):
    base = rows[0][1]
    print(f"{'variant':20} {'updates/s':>10} {'x fp32':>7} {'GFLOP/s':>8} {'of matmul peak':>15}")
    for name, rate, gflops in rows:
        print(f"{name:20} {rate:10.2f} {rate / base:7.2f} {gflops:8.1f} {gflops / peak:15.0%}")
    print(f"(matmul peak: {peak:.1f} GFLOP/s, float32 512x512 at {torch.get_num_threads()} "
          "threads; target for training: 1.5x today's fp32 at an equal final score)")
