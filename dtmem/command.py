"""What every command-line entry point shares (`dtmem` and the scripts in scripts/):
flags built from config dataclasses (CleanRL style: each field's docstring is its help,
its range from dtmem/limits.py), presets, and one way to end: one line and exit code 2
on bad input, 130 on Ctrl-C."""

import argparse
import ast
import inspect
import os
import sys
from dataclasses import fields
from pathlib import Path

from dtmem.errors import Interrupted, UserError
from dtmem.limits import LIMITS, flag_type


class Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line, exit code 2, like every other user-facing error.
        self.exit(2, f"{self.prog}: error: {message}\n")


def script_parser(doc):
    """The parser of a script in scripts/: its module docstring as --help, kept as written,
    and bad flags in one line."""
    return Parser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


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


def aligned(rows):
    """Rows of strings as lines of left-aligned columns, two spaces apart."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
            for row in rows]


def add_backend_flags(parser, jobs):
    """--backend, --address, --workers: where `jobs` run; the numbers never depend on it."""
    from dtmem.backend import BACKENDS

    parser.add_argument("--backend", choices=BACKENDS, default="local",
                        help=f"where {jobs} run: local processes (default) or Ray "
                        '(pip install "dtmem[ray]"); the numbers are the same')
    parser.add_argument("--address", help="with --backend ray: the Ray cluster to join "
                        "(default: start a local Ray)")
    parser.add_argument("--workers", type=flag_type("workers"),
                        help=f"{jobs} run at once (default 1; with --backend ray, every CPU)")


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


def run_reporting_errors(action, prog=None):
    """Run a command's work: bad input ends in one line on stderr and exit code 2, Ctrl-C
    in 130, a closed pipe (e.g. `dtmem data list | head`) quietly in 0."""
    prog = prog or Path(sys.argv[0]).name
    try:
        action()
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"{prog}: interrupted: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"{prog}: interrupted before anything was saved", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
