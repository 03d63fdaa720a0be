"""The `dtmem` command. Thin: it parses flags and calls the library."""

import re
import sys
from dataclasses import fields
from pathlib import Path

from dtmem.cli_flags import make_parser
from dtmem.command import (
    aligned,
    parse_with_preset,
    run_reporting_errors,
)
from dtmem.errors import UserError
from dtmem.tasks import all_tasks, resolve_task


def cmd_list(args):
    from dtmem.checkpoints import shipped_path
    from dtmem.memory import POLICIES, policy_names
    from dtmem.memory.namm.io import shipped_file

    rows = [("task", "gymnasium id", "shipped DT", "NAMMs (besides the zero-shot namm)")]
    for task in all_tasks().values():
        local = "namm-local" if shipped_file(task.name).exists() else "-"
        rows.append((task.name, task.env_id,
                     "yes" if shipped_path(task.name).exists() else "no", local))
    print("\n".join(aligned(rows)))
    print("\npolicies (dtmem rollout --policy NAME; settings with --set NAME=VALUE):")
    for name in policy_names():
        doc = " ".join((POLICIES[name].__doc__ or "").split())
        first_sentence = re.split(r"(?<! al)\. ", doc)[0].rstrip(".")
        print(f"  {name:11} {first_sentence}")


def cmd_data_list(args):
    from dtmem.data import dataset_status

    rows = [("task", "env", "local dataset", "", "minari remote id", "")]
    damaged = []
    for task in all_tasks().values():
        row = [task.name, task.env_id]
        for dataset_id in (task.local_id, task.remote_id):
            status, problem = dataset_status(dataset_id)
            row += [dataset_id, status]
            if problem:
                damaged.append(f"{dataset_id}: {problem}; rebuild it with `dtmem data build "
                               f"--task {task.name} --overwrite`")
        rows.append(row)
    print("\n".join(aligned(rows)))
    for line in damaged:
        print(f"damaged: {line}")


def cmd_data_build(args):
    from dtmem.data import build_dataset

    task = resolve_task(args.env, args.task)
    dataset = build_dataset(task, args.behavior, args.steps, args.seed, args.envs,
                            args.overwrite, dataset_id=args.dataset)
    print(f"built {dataset.spec.dataset_id}: {dataset.total_episodes} episodes, "
          f"{dataset.total_steps} steps")


def cmd_train(args):
    from dtmem.files import ensure_new_output, lock
    from dtmem.train import TrainConfig, train

    task = resolve_task(args.env, args.task)
    cfg = TrainConfig(task=task.name, **{f.name: getattr(args, f.name)
                                         for f in fields(TrainConfig) if f.name != "task"})
    out = args.out or f"runs/dt/{task.name}.pt"
    ensure_new_output(out, args.resume or args.overwrite, "--resume to continue it or ")
    with lock(out):
        train(cfg, out, resume=args.resume, device=args.device, download=args.download)


def policy_setting(text):
    """--set NAME=VALUE: the value as a number where it reads as one, else as text."""
    import json

    name, equals, value = text.partition("=")
    if not equals or not name:
        raise UserError(f"--set takes NAME=VALUE, got {text!r}")
    try:
        return name, json.loads(value)
    except ValueError:
        return name, value


def cmd_rollout(args):
    import torch

    from dtmem.backend import make_backend
    from dtmem.checkpoints import Checkpoint
    from dtmem.files import ensure_writable, write_json
    from dtmem.memory import PolicySpec, load_policy_file
    from dtmem.results import explain, run_cell
    from dtmem.runtime import pick_device

    torch.set_num_threads(args.threads)
    task = resolve_task(args.env, args.task)
    if args.compare:
        PolicySpec(args.compare).policy_class  # an unknown name fails now, not after the run
    if args.policy_file:
        load_policy_file(args.policy_file)
    options = dict(policy_setting(text) for text in args.set)
    spec = PolicySpec(args.policy, args.budget, args.ratio,
                      options | ({"namm_file": args.namm} if args.namm else {}))
    if args.namm and "namm_file" not in {f.name for f in fields(spec.policy_class)}:
        raise UserError(f"--namm gives a NAMM file, but policy {args.policy!r} reads none; "
                        "use --policy namm or namm-mlp")
    filmed = args.video_episodes or 1
    if args.video_episodes and not args.video:
        raise UserError("--video-episodes says how many episodes --video DIR films; give "
                        "--video")
    if args.video and filmed > args.episodes:
        raise UserError(f"--video-episodes {filmed} is more than the {args.episodes} "
                        "episodes run; film at most --episodes")
    if args.json:
        ensure_writable(args.json)
    checkpoint = Checkpoint.for_task(task, args.checkpoint, pick_device(args.device))
    with make_backend(args.backend, args.address, args.workers) as backend:
        sharding = {"shards": args.shards, "backend": backend}
        cell = run_cell(checkpoint, task, spec, args.episodes, args.seed, args.slots,
                        args.target_return, video=args.video and (args.video, filmed),
                        **sharding)
        base = args.compare and run_cell(checkpoint, task, PolicySpec(args.compare),
                                         args.episodes, args.seed, args.slots,
                                         args.target_return, **sharding)
    print(explain(cell, base or None))
    if args.json:
        write_json(args.json, cell)
        print(f"wrote {args.json}")


def cmd_evolve(args):
    import torch

    from dtmem.backend import make_backend
    from dtmem.evolve import Evolution, EvolveConfig
    from dtmem.files import ensure_writable, lock
    from dtmem.runtime import pick_device

    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    given = {f.name: getattr(args, f.name) for f in fields(EvolveConfig) if f.name != "stages"}
    out = args.resume or args.out
    if not out or (not args.resume and not args.tasks):
        raise UserError("give --tasks and --out for a new run, or --resume DIR")
    ensure_writable(Path(out) / "state.json")
    backend = make_backend(args.backend, args.address, args.workers)
    with lock(out), backend:
        if args.resume:
            if args.tasks or args.then:
                raise UserError("--resume continues the run's own tasks; drop --tasks/--then")
            run = Evolution.resume(args.resume, device, backend, asked=given)
        else:
            stages = [args.tasks.split(",")] + [stage.split(",") for stage in args.then]
            for task in {t for stage in stages for t in stage}:
                resolve_task(task=task)
            twice = next((stage for stage in stages if len(set(stage)) < len(stage)), None)
            if twice:
                raise UserError(f"a stage names a task twice ({','.join(twice)}); give each "
                                "task once (its fitness would count double)")
            if (Path(args.out) / "state.json").exists():
                raise UserError(f"{args.out} already holds a run; --resume it or choose "
                                "another --out")
            run = Evolution(EvolveConfig(stages=stages, **given), args.out, device, backend)
        jobs = max(map(len, run.cfg.stages)) * run.cfg.shards
        if (args.workers or 1) > jobs:
            print(f"note: {args.workers} workers, but a generation has at most {jobs} jobs "
                  "(tasks x shards); a new run with more --shards would keep them busy")
        run.run()
    print(f"{len(run.history)} generations in {run.out}; best.pt is the best-validated "
          "CMA-ES mean of the last stage, latest.pt the final mean")


def cmd_report(args):
    from dtmem.files import ensure_writable
    from dtmem.report import markdown, report, write_report

    if args.confirm and not Path(args.confirm).is_dir():
        raise UserError(f"--confirm {args.confirm} is not a folder; give the confirmation "
                        "block's folder of results files")
    if args.out:
        ensure_writable(Path(args.out) / "report.json")
    confirm = args.confirm or Path(args.results).parent / "confirm"
    rows, comparisons = report(args.results, confirm, args.episodes,
                               require_shipped=not args.any_checkpoint)
    print(markdown(rows, comparisons))
    if args.out:
        write_report(rows, comparisons, args.out)
        print(f"wrote {args.out}/report.json, report.csv and report.md")


def cmd_namm_import(args):
    from dtmem.files import ensure_new_output, provenance, relative_to_root
    from dtmem.memory.namm.io import import_original, save_namm

    ensure_new_output(args.out, args.overwrite)
    params, stats = import_original(args.checkpoint)
    save_namm(args.out, "bam", params, stats, args.n_up,
              {"source": f"imported from {relative_to_root(args.checkpoint)}",
               "provenance": provenance()})
    print(f"wrote {args.out}: BAM NAMM, {params.numel()} parameters, statistics of "
          f"{stats[2]} samples, n_up {args.n_up}")


def cmd_namm_ship(args):
    from dtmem.evolve import ship

    for path in ship(args.run, args.name, overwrite=args.overwrite):
        print(f"wrote {path}")


def cmd_namm_inspect(args):
    from dtmem import plots
    from dtmem.checkpoints import Checkpoint
    from dtmem.files import ensure_writable, relative_to_root
    from dtmem.memory import PolicySpec
    from dtmem.memory.namm import policy_for_file
    from dtmem.memory.namm.io import shipped_file

    task = resolve_task(args.env, args.task)
    path = args.namm or shipped_file("default")
    png = args.out and Path(args.out) / f"namm-kept-{task.name}.png"
    if png:
        ensure_writable(png)
        plots.pyplot()  # the figure needs matplotlib: find out before the episode
    spec = PolicySpec(policy_for_file(path), options={"namm_file": path})
    fractions = plots.kept_tokens(Checkpoint.for_task(task, args.checkpoint), task, spec,
                                  args.seed)
    print(f"{task.name}, one episode (seed {args.seed}), {relative_to_root(path)}: "
          "fraction of tokens kept")
    print(plots.kept_table(fractions))
    if png:
        png.parent.mkdir(parents=True, exist_ok=True)
        plots.kept_heatmap(fractions, task.name, png)
        print(f"wrote {png}")


def cmd_hf_import(args):
    from dtmem.hf import import_checkpoint

    task = resolve_task(task=args.task)
    meta = import_checkpoint(args.directory, task, args.out, args.state_stats,
                             args.context_steps, args.overwrite)
    for warning in meta["warnings"]:
        print(f"dtmem: warning: {warning}", file=sys.stderr)
    print(f"wrote {args.out}: {meta['source']} from {meta['hf_weights']} for {task.name}; "
          f"state statistics {meta['state_stats']}; K = {meta['context_steps']}")


def cmd_hf_export(args):
    from dtmem.hf import export_hf

    directory = export_hf(args.checkpoint, args.out, args.overwrite)
    print(f"wrote {directory}: config.json, model.safetensors (load with transformers' "
          "DecisionTransformerModel.from_pretrained) and dtmem.json (state statistics)")


def cmd_bench(args):
    import torch

    from dtmem import bench
    from dtmem.runtime import pick_device

    torch.set_num_threads(args.threads)
    task = resolve_task(args.env, args.task)
    device = pick_device(args.device)
    checkpoint = bench.bench_checkpoint(task, args.checkpoint, device)
    print(f"checkpoint {checkpoint.path or 'none: an untrained DT of the default size'}")
    print(f"task {task.name}, torch threads {torch.get_num_threads()}, device {device}")
    if args.bench_command == "train":
        bench.print_training_rates(*bench.training_rates(checkpoint.model.cfg,
                                                         compiled=args.compile))
        bench.print_data_loading(task, checkpoint.model.cfg)
        return
    if args.bench_command == "rollout":
        rows = bench.run_bench(checkpoint, task, bench.rollout_configs())
        bench.print_bench(rows, bench.cache_bytes(checkpoint.model, 64,
                                                  3 * task.max_episode_steps))
        print("timing window at 64 slots in 2 shards, in turn and on 2 worker processes",
              flush=True)
        bench.print_shards_bench(*bench.bench_shards(checkpoint, task))
    elif args.bench_command == "memory":
        bench.print_memory_bench(bench.run_bench(checkpoint, task, bench.memory_configs()))
    else:
        # The same 2 shards (so the same numbers) on 1 and on 2 worker processes.
        default, floor, results = bench.bench_generation(checkpoint, task)
        from dtmem.evolve import EvolveConfig

        print(f"one generation of the recipe: {EvolveConfig.population} members x "
              f"{EvolveConfig.episodes} episodes, {sum(r.length for r in results)} env steps; "
              f"env stepping alone {floor:.1f} s")
        print(f"default (1 worker, 1 shard): {default:.1f} s = {default / floor:.2f}x env "
              "stepping (target at most 3)")
        runs = {workers: bench.bench_generation(checkpoint, task, workers=workers, shards=2)
                for workers in (1, 2)}
        (one, _, sharded), (two, _, sharded_two) = runs[1], runs[2]
        same = [r.score for r in sharded] == [r.score for r in sharded_two]
        print(f"2 shards: 1 worker {one:.1f} s, 2 workers {two:.1f} s: ratio {two / one:.2f} "
              f"(target at most 0.6); scores identical: {'yes' if same else 'NO'}")


COMMANDS = {
    ("data", "list"): cmd_data_list, ("data", "build"): cmd_data_build,
    ("train", None): cmd_train, ("rollout", None): cmd_rollout,
    ("bench", "rollout"): cmd_bench, ("bench", "memory"): cmd_bench,
    ("bench", "evolve"): cmd_bench, ("bench", "train"): cmd_bench,
    ("evolve", None): cmd_evolve,
    ("namm", "import"): cmd_namm_import, ("namm", "inspect"): cmd_namm_inspect,
    ("namm", "ship"): cmd_namm_ship,
    ("hf", "import"): cmd_hf_import, ("hf", "export"): cmd_hf_export,
    ("report", None): cmd_report, ("list", None): cmd_list,
}


def main(argv=None):
    try:
        parser = make_parser()
        args = parse_with_preset(parser, argv, parser.preset_parsers)
    except SystemExit as e:  # argparse's own usage errors (already one line) and --help
        return e.code
    if args.command is None:
        print(parser.format_usage().strip() + "; `dtmem COMMAND --help` for one, `dtmem list` "
              "for tasks and policies", file=sys.stderr)
        return 2
    sub = getattr(args, f"{args.command}_command", None)
    return run_reporting_errors(lambda: COMMANDS[(args.command, sub)](args), "dtmem")


if __name__ == "__main__":
    sys.exit(main())
