"""The flags of the `dtmem` command: every subcommand, its options, ranges and defaults."""



from dtmem import __version__
from dtmem.command import (
    Parser,
    add_backend_flags,
    add_dataclass_flags,
    add_preset_flag,
    add_task_flags,
    add_threads_flag,
)
from dtmem.limits import flag_type


def make_parser():
    from dtmem.memory import policy_names
    from dtmem.train import TrainConfig

    parser = Parser(prog="dtmem", description="Memory policies for Decision Transformers.")
    parser.add_argument("--version", action="version", version=f"dtmem {__version__}")
    parser.preset_parsers = {}
    commands = parser.add_subparsers(dest="command", parser_class=Parser)
    commands.add_parser("list", help="the tasks with their shipped DTs and NAMMs, and the "
                        "memory policies")

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
    existing = train.add_mutually_exclusive_group()
    existing.add_argument("--resume", action="store_true", help="continue the checkpoint at --out")
    existing.add_argument("--overwrite", action="store_true", help="replace the checkpoint at --out")
    train.add_argument("--download", action="store_true", help="download a missing dataset")
    train.add_argument("--device", default="auto", help="auto, cpu or cuda")
    add_preset_flag(train, "train", parser.preset_parsers)

    roll = commands.add_parser("rollout", help="run a trained DT with a memory policy")
    add_task_flags(roll)
    roll.add_argument("--policy", default="recompute", help="memory policy (default recompute; "
                      f"`dtmem list` describes each): {', '.join(policy_names())}")
    roll.add_argument("--compare", metavar="POLICY", help="also run POLICY (e.g. recompute) "
                      "on the same seeds and print the paired gain")
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
    roll.add_argument("--shards", type=flag_type("shards"), default=1,
                      help="batched rollouts of episode blocks (default 1); with --workers 2, "
                      "2 shards use 2 cores. Shards change the floats, workers do not")
    roll.add_argument("--target-return", type=flag_type("target_return"), help="default: the task's target")
    roll.add_argument("--checkpoint", help="default: the shipped data/checkpoints/<task>.pt")
    roll.add_argument("--json", help="write a results file with provenance here")
    roll.add_argument("--video", metavar="DIR", help="film the first episodes as MP4s in DIR "
                      "(needs the video extra; rendering costs about 0.1-0.2 s a frame)")
    roll.add_argument("--video-episodes", type=flag_type("episodes"),
                      help="episodes filmed with --video (default 1)")
    roll.add_argument("--device", default="auto", help="auto, cpu or cuda")
    add_threads_flag(roll)
    add_backend_flags(roll, "shards")
    add_preset_flag(roll, "rollout", parser.preset_parsers)

    evo = commands.add_parser("evolve", help="evolve a NAMM with CMA-ES (also scripts/evolve.py)")
    evo.add_argument("--tasks", help="comma-separated tasks of the first stage")
    evo.add_argument("--then", action="append", default=[],
                     help="tasks of a further incremental stage (repeatable)")
    evo.add_argument("--out", help="run directory (state.json, log.csv, latest.pt, best.pt)")
    evo.add_argument("--resume", metavar="DIR", help="continue the run in DIR")
    evo.add_argument("--device", default="auto", help="auto, cpu or cuda")
    add_backend_flags(evo, "a generation's jobs (tasks x shards)")
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
    imp.add_argument("--overwrite", action="store_true", help="replace the file at --out")
    imp.add_argument("--n-up", type=flag_type("n_up"), default=512,
                     help="tokens between updates (the LLM run used 512)")
    ship = namm_commands.add_parser("ship", help="ship a finished evolution run in data/namm/")
    ship.add_argument("run", help="the run directory of `dtmem evolve --out`")
    ship.add_argument("--as", dest="name", required=True,
                      help="the NAMM's name: default, default-mlp, or the task it was evolved on")
    ship.add_argument("--overwrite", action="store_true",
                      help="replace a NAMM already shipped under that name")
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
    hf_in.add_argument("--out", required=True, help="the dtmem checkpoint to write")
    hf_in.add_argument("--overwrite", action="store_true", help="replace the file at --out")
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
    hf_out.add_argument("--out", required=True, help="the directory to write")
    hf_out.add_argument("--overwrite", action="store_true",
                        help="replace an earlier export at --out (never another folder)")

    bench = commands.add_parser("bench", help="throughput benchmarks")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True, parser_class=Parser)
    for name, help_text in (("rollout", "rollout speed vs recompute and env stepping"),
                            ("memory", "each memory policy's rollout time vs the full cache"),
                            ("evolve", "one generation on 1 and 2 workers vs env stepping"),
                            ("train", "DT training updates per second, variants side by side")):
        bench_one = bench_commands.add_parser(name, help=help_text)
        add_task_flags(bench_one)
        # HalfCheetah never terminates: every episode is 1000 steps, whatever the checkpoint.
        bench_one.set_defaults(env="halfcheetah")
        bench_one.description = "default task: halfcheetah-medium (episodes of fixed length)"
        bench_one.add_argument("--checkpoint", help="default: the shipped checkpoint, else an "
                               "untrained DT of the default size")
        bench_one.add_argument("--device", default="auto", help="auto, cpu or cuda")
        add_threads_flag(bench_one)
        if name == "train":
            bench_one.add_argument("--compile", action="store_true",
                                   help="also time torch.compile'd variants (minutes to compile)")
    return parser
