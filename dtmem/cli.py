"""The `dtmem` command. Thin: it parses flags and calls the library."""

import argparse
import ast
import inspect
import os
import sys
from dataclasses import fields
from pathlib import Path

from dtmem.errors import UserError
from dtmem.limits import LIMITS, flag_type
from dtmem.tasks import all_tasks, resolve_task


class Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line, exit code 2, like every other user-facing error.
        self.exit(2, f"{self.prog}: error: {message}\n")


def field_docs(cls):
    """The docstring under each field of a dataclass (CleanRL style), for --help."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr):
            docs[node.target.id] = after.value.value
    return docs


def add_dataclass_flags(parser, cls, skip=()):
    # argparse expands % in help strings; a docstring's "25%" must stay literal.
    docs = {name: doc.replace("%", "%%") for name, doc in field_docs(cls).items()}
    for f in fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool or f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                help=docs.get(f.name))
        else:
            kind = flag_type(f.name) if f.name in LIMITS else type(f.default)
            parser.add_argument(flag, type=kind, default=f.default,
                                help=f"{docs.get(f.name, '')} (default {f.default})")


def add_task_flags(parser):
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--env", help="environment; runs its default task (hopper -> hopper-medium)")
    group.add_argument("--task", help="a task by name, e.g. hopper-expert")


def add_threads_flag(parser):
    # A rollout step is many tiny tensor ops: extra CPU threads only add synchronisation.
    parser.add_argument("--threads", type=flag_type("threads"), default=1,
                        help="CPU threads for torch (default 1, fastest for rollouts)")


def add_preset_flag(parser, command, preset_parsers):
    from dtmem.presets import PRESETS

    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="named defaults, e.g. lab (docs/lab/); explicit flags still win")
    parser.set_defaults(preset_command=command)
    preset_parsers[command] = parser


def parse_with_preset(parser, argv, preset_parsers):
    """With --preset, parse twice: the preset's defaults go onto its command's parser
    first, so that flags given explicitly still win."""
    from dtmem.presets import preset_defaults

    args = parser.parse_args(argv)
    if getattr(args, "preset", None):
        target = preset_parsers[args.preset_command]
        target.set_defaults(**preset_defaults(args.preset, args.preset_command))
        args = parser.parse_args(argv)
    return args


def make_parser():
    from dtmem.train import TrainConfig

    parser = Parser(prog="dtmem", description="Memory policies for Decision Transformers.")
    parser.preset_parsers = {}
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    data = commands.add_parser("data", help="list or build Minari datasets")
    data_commands = data.add_subparsers(dest="data_command", required=True, parser_class=Parser)
    data_commands.add_parser("list", help="the tasks and which datasets are present locally")
    build = data_commands.add_parser("build", help="collect a local Minari dataset")
    add_task_flags(build)
    build.add_argument("--behavior", default="random",
                       help="behaviour policy: random, medium, expert, or a policy .npz")
    build.add_argument("--steps", type=flag_type("steps"), default=1_000_000, help="env steps to collect")
    build.add_argument("--seed", type=flag_type("seed"), default=0, help="episode i is reset with seed + i")
    build.add_argument("--envs", type=flag_type("envs"), default=16, help="envs stepped in lockstep")
    build.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    add_preset_flag(build, "data build", parser.preset_parsers)

    train = commands.add_parser("train", help="train a Decision Transformer")
    add_task_flags(train)
    add_dataclass_flags(train, TrainConfig, skip=("task",))
    train.add_argument("--out", help="checkpoint path (default runs/dt/<task>.pt)")
    train.add_argument("--resume", action="store_true", help="continue the checkpoint at --out")
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
    roll.add_argument("--namm", help="NAMM file for --policy namm/namm-mlp (default: the "
                      "shipped data/namm/default.pt)")
    roll.add_argument("--episodes", type=flag_type("episodes"), default=20,
                      help="episodes to run (default 20)")
    roll.add_argument("--slots", type=flag_type("slots"), help="episodes run in lockstep (default all)")
    roll.add_argument("--seed", type=flag_type("seed"), default=0, help="episode i is reset with seed + i")
    roll.add_argument("--target-return", type=flag_type("target_return"), help="default: the task's target")
    roll.add_argument("--checkpoint", help="default: the shipped data/checkpoints/<task>.pt")
    roll.add_argument("--json", help="write a results file with provenance here")
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
    evo.add_argument("--workers", type=flag_type("workers"), default=1,
                     help="evaluate tasks in this many parallel processes")
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

    bench = commands.add_parser("bench", help="throughput benchmarks")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True, parser_class=Parser)
    for name, help_text in (("rollout", "rollout speed vs recompute and env stepping"),
                            ("memory", "each memory policy's rollout time vs the full cache"),
                            ("evolve", "one evolution generation vs env stepping")):
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
    from dtmem.data import is_local

    print(f"{'task':18} {'env':15} {'local dataset':28} {'minari remote id':28}")
    for task in all_tasks().values():
        local = task.local_id + (" (present)" if is_local(task.local_id) else "")
        remote = task.remote_id + (" (present)" if is_local(task.remote_id) else "")
        print(f"{task.name:18} {task.env_id:15} {local:28} {remote:28}")


def cmd_data_build(args):
    from dtmem.data import build_dataset

    task = resolve_task(args.env, args.task)
    dataset = build_dataset(task, args.behavior, args.steps, args.seed, args.envs, args.overwrite)
    print(f"built {task.local_id}: {dataset.total_episodes} episodes, {dataset.total_steps} steps")


def cmd_train(args):
    from dtmem.files import ensure_writable
    from dtmem.train import TrainConfig, train

    task = resolve_task(args.env, args.task)
    cfg = TrainConfig(task=task.name, **{f.name: getattr(args, f.name)
                                         for f in fields(TrainConfig) if f.name != "task"})
    out = args.out or f"runs/dt/{task.name}.pt"
    ensure_writable(out)
    train(cfg, out, resume=args.resume, device=args.device, download=args.download)


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
    spec = PolicySpec(args.policy, args.budget, args.ratio,
                      {"namm_file": args.namm} if args.namm else {})
    if args.json:
        ensure_writable(args.json)
    checkpoint = Checkpoint.for_task(task, args.checkpoint, pick_device(args.device))
    cell = run_cell(checkpoint, task, spec, args.episodes, args.seed, args.slots,
                    args.target_return)
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

    from dtmem.evolve import Evolution, EvolveConfig
    from dtmem.runtime import pick_device

    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    if args.resume:
        run = Evolution.resume(args.resume, device, args.workers)
    else:
        if not args.tasks or not args.out:
            raise UserError("give --tasks and --out for a new run, or --resume DIR")
        stages = [args.tasks.split(",")] + [stage.split(",") for stage in args.then]
        for task in {t for stage in stages for t in stage}:
            resolve_task(task=task)
        if (Path(args.out) / "state.json").exists():
            raise UserError(f"{args.out} already holds a run; --resume it or choose another --out")
        cfg = EvolveConfig(stages=stages, **{f.name: getattr(args, f.name)
                                             for f in fields(EvolveConfig) if f.name != "stages"})
        run = Evolution(cfg, args.out, device, args.workers)
    run.run()
    print(f"{len(run.history)} generations in {run.out}; the CMA-ES mean is latest.pt, the best "
          "evaluated mean best.pt")


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
        wall, floor, results = bench.bench_generation(checkpoint, task)
        steps = sum(r.length for r in results)
        print(f"one generation: 32 members x 2 episodes, {steps} env steps, {wall:.1f} s; "
              f"env stepping alone {floor:.1f} s; ratio {wall / floor:.2f}")


COMMANDS = {
    ("data", "list"): cmd_data_list, ("data", "build"): cmd_data_build,
    ("train", None): cmd_train, ("rollout", None): cmd_rollout,
    ("bench", "rollout"): cmd_bench, ("bench", "memory"): cmd_bench,
    ("bench", "evolve"): cmd_bench, ("evolve", None): cmd_evolve,
    ("namm", "import"): cmd_namm_import, ("namm", "inspect"): cmd_namm_inspect,
    ("namm", "ship"): cmd_namm_ship,
    ("report", None): cmd_report,
}


def run_reporting_errors(action, prog=None):
    """Run a command's work: bad input ends in one line on stderr and exit code 2, Ctrl-C
    in 130, a closed pipe (e.g. `dtmem data list | head`) quietly in 0."""
    prog = prog or Path(sys.argv[0]).name
    try:
        action()
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


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
