"""The `dtmem` command. Thin: it parses flags and calls the library."""

import sys
from dataclasses import fields
from pathlib import Path

from dtmem import __version__
from dtmem.backend import BACKENDS
from dtmem.command import (
    Parser,
    add_dataclass_flags,
    add_preset_flag,
    add_task_flags,
    add_threads_flag,
    parse_with_preset,
    run_reporting_errors,
)
from dtmem.errors import UserError
from dtmem.limits import flag_type
from dtmem.tasks import all_tasks, resolve_task


def make_parser():
    from dtmem.train import TrainConfig

    parser = Parser(prog="dtmem", description="Memory policies for Decision Transformers.")
    parser.add_argument("--version", action="version", version=f"dtmem {__version__}")
    parser.preset_parsers = {}
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    data = commands.add_parser("data", help="list or build Minari datasets")
    data_commands = data.add_subparsers(dest="data_command", required=True, parser_class=Parser)
    data_commands.add_parser("list", help="the tasks and which datasets are present locally")
    build = data_commands.add_parser("build", help="collect a local Minari dataset")
    add_task_flags(build)
    build.add_argument("--behavior", help="behaviour policy: random, medium, expert, or a "
                       "policy .npz (default: the task's quality, e.g. medium for hopper-medium)")
    build.add_argument("--dataset", help="the Minari id to write (default: the task's local "
                       "id for its own quality, else e.g. dtmem/hopper/random-v0)")
    build.add_argument("--steps", type=flag_type("steps"), default=1_000_000,
                       help="env steps to collect, exactly (default 1000000, as Minari's)")
    build.add_argument("--seed", type=flag_type("seed"), default=0,
                       help="episode i is reset with seed + i (default 0)")
    build.add_argument("--envs", type=flag_type("envs"), default=16,
                       help="envs stepped in lockstep (default 16)")
    build.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    add_preset_flag(build, "data build", parser.preset_parsers)

    train = commands.add_parser("train", help="train a Decision Transformer")
    add_task_flags(train)
    add_dataclass_flags(train, TrainConfig, skip=("task",))
    train.add_argument("--out", help="checkpoint path (default runs/dt/<task>.pt)")
    train.add_argument("--resume", action="store_true", help="continue the checkpoint at --out")
    train.add_argument("--overwrite", action="store_true", help="replace the checkpoint at --out")
    train.add_argument("--download", action="store_true", help="download a missing dataset")
    train.add_argument("--device", default="auto", help="auto, cpu or cuda")
    add_preset_flag(train, "train", parser.preset_parsers)

    roll = commands.add_parser("rollout", help="run a trained DT with a memory policy")
    add_task_flags(roll)
    roll.add_argument("--policy", default="recompute", help="memory policy (default recompute)")
    roll.add_argument("--policy-file", help="a Python file that registers more policies "
                      "(see docs/lab/recent_states.py)")
    roll.add_argument("--budget", type=flag_type("budget"), help="tokens kept per layer (policies with a budget; "
                      "default 3K = 60)")
    roll.add_argument("--ratio", type=flag_type("ratio"), help="or: fraction of the episode's tokens kept")
    roll.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                      help="a policy setting, e.g. --set pyramid=0.5 or --set sinks=8 "
                      "(repeatable; an unknown name lists the policy's settings)")
    roll.add_argument("--namm", help="NAMM file for --policy namm/namm-mlp (default: the "
                      "shipped data/namm/default.pt)")
    roll.add_argument("--episodes", type=flag_type("episodes"), default=20,
                      help="episodes to run (default 20)")
    roll.add_argument("--slots", type=flag_type("slots"), help="episodes run in lockstep (default all)")
    roll.add_argument("--seed", type=flag_type("seed"), default=0, help="episode i is reset with seed + i")
    roll.add_argument("--target-return", type=flag_type("target_return"), help="default: the task's target")
    roll.add_argument("--checkpoint", help="default: the shipped data/checkpoints/<task>.pt")
    roll.add_argument("--json", help="write a results file with provenance here")
    roll.add_argument("--video", metavar="DIR", help="film the first episodes as MP4s in DIR "
                      "(needs the video extra; rendering costs about 0.1-0.2 s a frame)")
    roll.add_argument("--video-episodes", type=flag_type("episodes"), default=1,
                      help="episodes filmed with --video (default 1)")
    roll.add_argument("--device", default="auto", help="auto, cpu or cuda")
    add_threads_flag(roll)
    add_preset_flag(roll, "rollout", parser.preset_parsers)

    evo = commands.add_parser("evolve", help="evolve a NAMM with CMA-ES (also scripts/evolve.py)")
    evo.add_argument("--tasks", help="comma-separated tasks of the first stage")
    evo.add_argument("--then", action="append", default=[],
                     help="tasks of a further incremental stage (repeatable)")
    evo.add_argument("--out", help="run directory (state.json, log.csv, latest.pt, best.pt)")
    evo.add_argument("--resume", metavar="DIR", help="continue the run in DIR")
    evo.add_argument("--device", default="auto", help="auto, cpu or cuda")
    evo.add_argument("--backend", choices=BACKENDS, default="local",
                     help="where a generation's jobs (tasks x shards) run: local processes "
                     '(default) or Ray (pip install "dtmem[ray]")')
    evo.add_argument("--address", help="with --backend ray: the Ray cluster to join (default: "
                     "start a local Ray)")
    evo.add_argument("--workers", type=flag_type("workers"),
                     help="jobs run at once (default 1; with --backend ray, every CPU); the "
                     "numbers do not depend on it")
    add_threads_flag(evo)
    from dtmem.evolve import EvolveConfig
    add_dataclass_flags(evo, EvolveConfig, skip=("stages",))
    add_preset_flag(evo, "evolve", parser.preset_parsers)

    rep = commands.add_parser("report", help="the table of return gains from results files")
    rep.add_argument("--results", default="results/cells",
                     help="development block: rollout results files (one per task and policy)")
    rep.add_argument("--confirm", help="confirmation block: its cells replace the "
                     "development ones (default: confirm/ beside --results, if present)")
    rep.add_argument("--out", help="also write report.{json,csv,md} here (default: print only)")
    rep.add_argument("--episodes", type=flag_type("episodes"), default=50, help="episodes every cell needs")
    rep.add_argument("--any-checkpoint", action="store_true",
                     help="accept cells from checkpoints other than the shipped ones")
    add_preset_flag(rep, "report", parser.preset_parsers)

    namm_cmd = commands.add_parser("namm", help="NAMM files")
    namm_commands = namm_cmd.add_subparsers(dest="namm_command", required=True,
                                            parser_class=Parser)
    imp = namm_commands.add_parser("import", help="import a checkpoint of the original NAMM code")
    imp.add_argument("checkpoint", help="its torch file (CMA-ES state and normaliser buffers)")
    imp.add_argument("--out", required=True, help="the dtmem NAMM file to write")
    imp.add_argument("--n-up", type=flag_type("n_up"), default=512,
                     help="tokens between updates (the LLM run used 512)")
    ship = namm_commands.add_parser("ship", help="ship a finished evolution run in data/namm/")
    ship.add_argument("run", help="the run directory of `dtmem evolve --out`")
    ship.add_argument("--as", dest="name", required=True,
                      help="the NAMM's name: default, default-mlp, or the task it was evolved on")
    ins = namm_commands.add_parser("inspect", help="which tokens a NAMM keeps over an episode")
    ins.add_argument("namm", nargs="?", help="NAMM file (default: the shipped one)")
    add_task_flags(ins)
    ins.add_argument("--checkpoint", help="default: the shipped data/checkpoints/<task>.pt")
    ins.add_argument("--seed", type=flag_type("seed"), default=0, help="env seed of the episode")
    ins.add_argument("--out", help="also draw namm-kept-<task>.png here (needs matplotlib)")

    hf = commands.add_parser("hf", help="Hugging Face transformers Decision Transformers")
    hf_commands = hf.add_subparsers(dest="hf_command", required=True, parser_class=Parser)
    hf_in = hf_commands.add_parser("import", help="a DecisionTransformerModel directory -> a "
                                   "dtmem checkpoint")
    hf_in.add_argument("directory", help="config.json plus model.safetensors or "
                       "pytorch_model.bin (nothing from it runs)")
    hf_in.add_argument("--task", required=True, help="the task it acts in, e.g. hopper-medium")
    hf_in.add_argument("--out", required=True, help="the dtmem checkpoint to write (must not "
                       "exist)")
    hf_in.add_argument("--state-stats", metavar="FILE", help='JSON {"state_mean": [...], '
                       '"state_std": [...]} (or .npz of those arrays): the state normaliser it '
                       "was trained with (default: the directory's dtmem.json, else mean 0, "
                       "std 1, with a warning)")
    hf_in.add_argument("--context-steps", type=flag_type("context_steps"),
                       help="K, the window it was trained on (default: the directory's "
                       "dtmem.json, else 20)")
    hf_out = hf_commands.add_parser("export", help="a dtmem checkpoint -> a "
                                    "DecisionTransformerModel directory")
    hf_out.add_argument("checkpoint", help="the dtmem checkpoint")
    hf_out.add_argument("--out", required=True, help="the directory to write (must not exist)")

    bench = commands.add_parser("bench", help="throughput benchmarks")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True, parser_class=Parser)
    for name, help_text in (("rollout", "rollout speed vs recompute and env stepping"),
                            ("memory", "each memory policy's rollout time vs the full cache"),
                            ("evolve", "one generation on 1 and 2 workers vs env stepping")):
        bench_one = bench_commands.add_parser(name, help=help_text)
        add_task_flags(bench_one)
        # HalfCheetah never terminates: every episode is 1000 steps, whatever the checkpoint.
        bench_one.set_defaults(env="halfcheetah")
        bench_one.add_argument("--checkpoint", help="default: the shipped checkpoint, else an "
                               "untrained DT of the default size")
        bench_one.add_argument("--device", default="auto", help="auto, cpu or cuda")
        add_threads_flag(bench_one)
    return parser


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
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
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
    from dtmem.files import ensure_writable, lock
    from dtmem.train import TrainConfig, train

    task = resolve_task(args.env, args.task)
    cfg = TrainConfig(task=task.name, **{f.name: getattr(args, f.name)
                                         for f in fields(TrainConfig) if f.name != "task"})
    out = args.out or f"runs/dt/{task.name}.pt"
    ensure_writable(out)
    if Path(out).exists() and not (args.resume or args.overwrite):
        raise UserError(f"{out} already exists; pass --resume to continue it or --overwrite "
                        "to replace it")
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

    from dtmem.checkpoints import Checkpoint
    from dtmem.files import ensure_writable, write_json
    from dtmem.memory import PolicySpec, load_policy_file
    from dtmem.results import run_cell
    from dtmem.runtime import pick_device

    torch.set_num_threads(args.threads)
    task = resolve_task(args.env, args.task)
    if args.policy_file:
        load_policy_file(args.policy_file)
    options = dict(policy_setting(text) for text in args.set)
    spec = PolicySpec(args.policy, args.budget, args.ratio,
                      options | ({"namm_file": args.namm} if args.namm else {}))
    if args.json:
        ensure_writable(args.json)
    checkpoint = Checkpoint.for_task(task, args.checkpoint, pick_device(args.device))
    cell = run_cell(checkpoint, task, spec, args.episodes, args.seed, args.slots,
                    args.target_return, video=args.video and (args.video, args.video_episodes))
    summary = cell["summary"]
    lo, hi = summary["score_ci95"]
    print(f"{task.name} {args.policy}: normalised score {summary['mean_score']:.1f} "
          f"(95% CI {lo:.1f}..{hi:.1f}), return {summary['mean_return']:.1f}, length "
          f"{summary['mean_length']:.0f}, tokens mean {summary['mean_tokens']:.0f} max "
          f"{summary['max_tokens']} over {summary['episodes']} episodes "
          f"(refs {task.ref_source}: {task.ref_min:g}..{task.ref_max:g})")
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
    from dtmem.report import markdown, report, write_report

    confirm = args.confirm or Path(args.results).parent / "confirm"
    rows, comparisons = report(args.results, confirm, args.episodes,
                               require_shipped=not args.any_checkpoint)
    print(markdown(rows, comparisons))
    if args.out:
        write_report(rows, comparisons, args.out)
        print(f"wrote {args.out}/report.json, report.csv and report.md")


def cmd_namm_import(args):
    from dtmem.files import provenance, relative_to_root
    from dtmem.memory.namm.io import import_original, save_namm

    params, stats = import_original(args.checkpoint)
    save_namm(args.out, "bam", params, stats, args.n_up,
              {"source": f"imported from {relative_to_root(args.checkpoint)}",
               "provenance": provenance()})
    print(f"wrote {args.out}: BAM NAMM, {params.numel()} parameters, statistics of "
          f"{stats[2]} samples, n_up {args.n_up}")


def cmd_namm_ship(args):
    from dtmem.evolve import ship

    for path in ship(args.run, args.name):
        print(f"wrote {path}")


def cmd_namm_inspect(args):
    from dtmem import plots
    from dtmem.checkpoints import Checkpoint
    from dtmem.memory import PolicySpec
    from dtmem.memory.namm import policy_for_file
    from dtmem.memory.namm.io import shipped_file

    task = resolve_task(args.env, args.task)
    path = args.namm or shipped_file("default")
    if args.out:
        plots.pyplot()  # the figure needs matplotlib: find out before the episode
    spec = PolicySpec(policy_for_file(path), options={"namm_file": path})
    fractions = plots.kept_tokens(Checkpoint.for_task(task, args.checkpoint), task, spec,
                                  args.seed)
    print(f"{task.name}, one episode (seed {args.seed}), {path}: fraction of tokens kept")
    print(plots.kept_table(fractions))
    if args.out:
        png = Path(args.out) / f"namm-kept-{task.name}.png"
        png.parent.mkdir(parents=True, exist_ok=True)
        plots.kept_heatmap(fractions, task.name, png)
        print(f"wrote {png}")


def cmd_hf_import(args):
    from dtmem.hf import import_checkpoint

    task = resolve_task(task=args.task)
    meta = import_checkpoint(args.directory, task, args.out, args.state_stats,
                             args.context_steps)
    for warning in meta["warnings"]:
        print(f"dtmem: warning: {warning}", file=sys.stderr)
    print(f"wrote {args.out}: {meta['source']} from {meta['hf_weights']} for {task.name}; "
          f"state statistics {meta['state_stats']}; K = {meta['context_steps']}")


def cmd_hf_export(args):
    from dtmem.hf import export_hf

    directory = export_hf(args.checkpoint, args.out)
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
    if args.bench_command == "rollout":
        rows = bench.run_bench(checkpoint, task, bench.rollout_configs())
        bench.print_bench(rows, bench.cache_bytes(checkpoint.model, 64,
                                                  3 * task.max_episode_steps))
    elif args.bench_command == "memory":
        bench.print_memory_bench(bench.run_bench(checkpoint, task, bench.memory_configs()))
    else:
        # The same 2 shards (so the same numbers) on 1 and on 2 worker processes.
        runs = {workers: bench.bench_generation(checkpoint, task, workers=workers, shards=2)
                for workers in (1, 2)}
        (one, floor, results), (two, _, results_two) = runs[1], runs[2]
        same = [r.score for r in results] == [r.score for r in results_two]
        print(f"one generation: 32 members x 2 episodes in 2 shards, "
              f"{sum(r.length for r in results)} env steps; env stepping alone {floor:.1f} s")
        print(f"1 worker {one:.1f} s ({one / floor:.2f}x env stepping), 2 workers {two:.1f} s: "
              f"ratio {two / one:.2f} (target at most 0.6); scores identical: "
              f"{'yes' if same else 'NO'}")


COMMANDS = {
    ("data", "list"): cmd_data_list, ("data", "build"): cmd_data_build,
    ("train", None): cmd_train, ("rollout", None): cmd_rollout,
    ("bench", "rollout"): cmd_bench, ("bench", "memory"): cmd_bench,
    ("bench", "evolve"): cmd_bench, ("evolve", None): cmd_evolve,
    ("namm", "import"): cmd_namm_import, ("namm", "inspect"): cmd_namm_inspect,
    ("namm", "ship"): cmd_namm_ship,
    ("hf", "import"): cmd_hf_import, ("hf", "export"): cmd_hf_export,
    ("report", None): cmd_report,
}


def main(argv=None):
    try:
        parser = make_parser()
        args = parse_with_preset(parser, argv, parser.preset_parsers)
    except SystemExit as e:  # argparse's own usage errors (already one line) and --help
        return e.code
    sub = getattr(args, f"{args.command}_command", None)
    return run_reporting_errors(lambda: COMMANDS[(args.command, sub)](args), "dtmem")


if __name__ == "__main__":
    sys.exit(main())
