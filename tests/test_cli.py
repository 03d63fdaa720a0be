"""The `dtmem` command end to end on real envs and a real local dataset, and every kind
of bad input: one line on stderr, exit code 2, no traceback, nothing written."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from dtmem.cli import main
from dtmem.errors import Interrupted


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err):
    return code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_data_list_shows_eight_tasks_and_local_presence(capsys, hopper_dataset):
    code, out, _ = run(capsys, "data", "list")
    assert code == 0
    rows = [line for line in out.splitlines()[1:] if line.strip()]
    assert len(rows) == 8
    hopper = next(line.split() for line in rows if line.startswith("hopper-medium "))
    walker = next(line.split() for line in rows if line.startswith("walker2d-expert "))
    assert hopper[2:4] == ["dtmem/hopper/medium-v0", "present"]
    assert walker[2:4] == ["dtmem/walker2d/expert-v0", "absent"]
    # Columns line up: every row's local dataset starts where the header's does.
    starts = {line.index("dtmem/") for line in rows}
    assert len(starts) == 1 and out.splitlines()[0].index("local dataset") in starts


@pytest.mark.parametrize("policy", ["recompute", "window", "full"])
def test_rollout_every_base_policy_writes_results_with_provenance(capsys, tmp_path, checkpoint,
                                                                  policy):
    out = tmp_path / "r.json"
    code, stdout, _ = run(capsys, "rollout", "--env", "hopper", "--policy", policy,
                          "--episodes", "3", "--slots", "2", "--checkpoint", str(checkpoint),
                          "--json", str(out))
    assert code == 0 and "normalised score" in stdout
    result = json.loads(out.read_text())
    assert result["policy"] == policy and len(result["episodes"]) == 3
    assert [e["seed"] for e in result["episodes"]] == [0, 1, 2]
    assert result["dataset_id"] == "dtmem/hopper/medium-v0"
    for key in ("command", "commit", "date", "machine", "wall_seconds"):
        assert key in result["provenance"]
    assert {"cpu", "cpu_capability", "torch_threads"} <= result["provenance"]["machine"].keys()
    assert all(e["max_tokens"] <= 3 * 20 for e in result["episodes"]) or policy == "full"


def test_provenance_names_paths_in_and_beside_the_repository_relative_to_it(monkeypatch):
    """A command given absolute paths (the workspace's ../runs, the repository's data/)
    is recorded without the machine's directories; paths elsewhere are kept as given."""
    from dtmem.files import command_line
    from dtmem.tasks import ROOT

    monkeypatch.setattr(sys, "argv", [
        str(ROOT / "scripts" / "build_suite.py"), "--runs", str(ROOT.parent / "runs"),
        "--checkpoint", str(ROOT / "data" / "checkpoints" / "hopper-medium.pt"),
        "--json", "/nonexistent-elsewhere/r.json"])
    assert command_line() == ("scripts/build_suite.py --runs ../runs --checkpoint "
                              "data/checkpoints/hopper-medium.pt --json /nonexistent-elsewhere/r.json")
    # A console script installed in a virtual environment beside the repository.
    monkeypatch.setattr(sys, "argv", [str(ROOT.parent / "venv" / "bin" / "dtmem"), "list"])
    assert command_line() == "dtmem list"


def test_same_seed_same_numbers_and_slots_do_not_matter_for_recompute(capsys, tmp_path, checkpoint):
    returns = []
    for slots in ("1", "3", "3"):
        out = tmp_path / f"r{len(returns)}.json"
        run(capsys, "rollout", "--task", "hopper-medium", "--episodes", "3", "--slots", slots,
            "--checkpoint", str(checkpoint), "--json", str(out))
        returns.append([e["ret"] for e in json.loads(out.read_text())["episodes"]])
    assert returns[1] == returns[2]
    assert returns[0] == pytest.approx(returns[1], rel=1e-4)


def test_shards_are_their_episode_blocks_run_apart_on_any_number_of_workers(capsys, tmp_path,
                                                                          checkpoint):
    """--shards 2 runs episodes 0..2 and 3..4 as two batched rollouts: exactly what two
    rollouts of those blocks give, in this process or on 2 worker processes."""
    def episodes(*argv):
        out = tmp_path / "cell.json"
        run(capsys, "rollout", "--task", "hopper-medium", "--policy", "h2o", "--budget", "12",
            "--checkpoint", str(checkpoint), "--json", str(out), *argv)
        return [(e["episode"], e["seed"], e["ret"]) for e in json.loads(out.read_text())["episodes"]]

    first, second = episodes("--episodes", "3"), episodes("--episodes", "2", "--seed", "3")
    apart = first + [(episode + 3, seed, ret) for episode, seed, ret in second]
    assert episodes("--episodes", "5", "--shards", "2") == apart
    assert episodes("--episodes", "5", "--shards", "2", "--workers", "2") == apart
    for argv, needle in ((["--episodes", "2", "--shards", "3"], "--shards"),
                         (["--shards", "2", "--video", str(tmp_path / "films")], "--video")):
        code, _, err = run(capsys, "rollout", "--task", "hopper-medium", "--checkpoint",
                           str(checkpoint), *argv)
        assert one_line_error(code, err) and needle in err
    assert not (tmp_path / "films").exists()


def test_interrupted_training_resumes_to_the_same_weights(hopper_dataset, tmp_path,
                                                         monkeypatch):
    import torch

    from dtmem.checkpoints import read_checkpoint
    from dtmem.data import WindowSampler
    from dtmem.train import TrainConfig, train

    cfg = TrainConfig(steps=12, batch_size=8, n_layer=1, n_embd=16, eval_every=0,
                      eval_episodes=1, checkpoint_every=100, warmup_steps=4)
    train(cfg, tmp_path / "straight.pt", progress=False)

    sample, calls = WindowSampler.sample, []

    def interrupt_at_step_7(self, batch_size):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt  # Ctrl-C: the trainer saves, then stops
        return sample(self, batch_size)

    monkeypatch.setattr(WindowSampler, "sample", interrupt_at_step_7)
    with pytest.raises(Interrupted, match="update 6 is saved"):
        train(cfg, tmp_path / "resumed.pt", progress=False)
    interrupted = read_checkpoint(tmp_path / "resumed.pt")
    assert interrupted["steps"] == 6
    del interrupted["provenance"]["segments"]  # as checkpoints made before segments were
    torch.save(interrupted, tmp_path / "resumed.pt")
    monkeypatch.setattr(WindowSampler, "sample", sample)
    train(cfg, tmp_path / "resumed.pt", resume=True, progress=False)
    a, b = (read_checkpoint(tmp_path / n) for n in ("straight.pt", "resumed.pt"))
    assert a["steps"] == b["steps"] == 12
    # Each run that made a checkpoint is named in it, with the machine it ran on.
    assert [s["steps"] for s in a["provenance"]["segments"]] == [[0, 12]]
    assert [s["steps"] for s in b["provenance"]["segments"]] == [[None, 6], [6, 12]]
    assert "cpu" in b["provenance"]["segments"][0]["machine"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    # The training log beside each checkpoint reads as one run: loss every 10 updates and
    # at the end, then the final evaluation with its CI.
    from dtmem.train import log_path

    logs = [[{k: v for k, v in json.loads(line).items() if k != "wall"}
             for line in log_path(tmp_path / n).read_text().splitlines()]
            for n in ("straight.pt", "resumed.pt")]
    assert logs[0] == logs[1]
    assert [row["step"] for row in logs[0]] == [10, 12, 12]
    assert "loss" in logs[0][0] and "lr" in logs[0][0] and len(logs[0][2]["score_ci95"]) == 2


def test_a_finished_training_extends_to_the_weights_of_a_longer_run(hopper_dataset, tmp_path):
    """More --steps on --resume continues a finished training (e.g. a 10k-update DT to the
    field's 100k), saving at another cadence: the same updates as one longer run."""
    import torch

    from dtmem.checkpoints import read_checkpoint
    from dtmem.errors import UserError
    from dtmem.train import TrainConfig, train

    cfg = TrainConfig(steps=12, batch_size=8, n_layer=1, n_embd=16, eval_every=0,
                      eval_episodes=1, checkpoint_every=100, warmup_steps=4)
    train(cfg, tmp_path / "straight.pt", progress=False)
    train(replace(cfg, steps=8), tmp_path / "extended.pt", progress=False)
    with pytest.raises(UserError, match="has 8 updates already; give --steps 8 or more"):
        train(replace(cfg, steps=6), tmp_path / "extended.pt", resume=True, progress=False)
    train(replace(cfg, checkpoint_every=3), tmp_path / "extended.pt", resume=True,
          progress=False)
    a, b = (read_checkpoint(tmp_path / n) for n in ("straight.pt", "extended.pt"))
    assert a["steps"] == b["steps"] == 12
    assert [s["steps"] for s in b["provenance"]["segments"]] == [[0, 8], [8, 12]]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    moments = [[state["exp_avg_sq"] for state in c["training_state"]["optimizer"]["state"].values()]
               for c in (a, b)]
    assert all(torch.equal(x, y) for x, y in zip(*moments))
    # The short run's final evaluation stays in the history, where it was made.
    assert [h["step"] for h in b["metrics"]["history"]] == [8, 12]


def test_console_script_exit_code_and_single_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dtmem.cli", "rollout", "--policy", "nope"],
                          capture_output=True, text=True)
    assert one_line_error(proc.returncode, proc.stderr)
    assert "valid policies: recompute, " in proc.stderr


@pytest.mark.parametrize("argv, needle", [
    (["rollout", "--task", "hopper-hard"], "unknown task"),
    (["rollout", "--env", "pong"], "unknown env"),
    (["rollout", "--policy", "magic"], "unknown policy"),
    (["rollout", "--episodes", "0"], "must be an integer from 1"),
    (["rollout", "--episodes", "-3"], "must be an integer from 1"),
    (["rollout", "--seed", "-5"], "must be an integer from 0 to 2,147,483,647, got -5"),
    (["train", "--steps", "0"], "must be an integer from 1"),
    (["data", "build", "--env", "hopper", "--steps", "0"], "must be an integer from 1"),
    (["data", "build", "--env", "hopper", "--behavior", "wizard", "--overwrite"],
     "unknown behaviour policy"),
    (["data", "build", "--env", "hopper", "--steps", "10"], "already exists"),
    (["train", "--env", "walker2d", "--steps", "5"], "no dataset for walker2d-medium"),
    (["rollout", "--checkpoint", "/nonexistent/ckpt.pt"], "does not exist"),
])
def test_bad_input_is_one_line_exit_2(capsys, hopper_dataset, argv, needle):
    code, _, err = run(capsys, *argv)
    assert one_line_error(code, err), err
    assert needle in err


def test_checkpoint_for_another_env_is_refused(capsys, checkpoint):
    code, _, err = run(capsys, "rollout", "--env", "halfcheetah", "--checkpoint", str(checkpoint))
    assert one_line_error(code, err) and "does not fit" in err


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_checkpoint_is_refused(capsys, tmp_path, checkpoint, damage):
    bad = tmp_path / "bad.pt"
    data = checkpoint.read_bytes()
    bad.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a checkpoint")
    code, _, err = run(capsys, "rollout", "--checkpoint", str(bad))
    assert one_line_error(code, err) and "corrupt" in err


def test_checkpoint_with_code_is_not_executed(capsys, tmp_path):
    """A pickle that would run code on load is refused by weights_only loading."""
    import pickle

    class Evil:
        def __reduce__(self):
            return (exec, ("open(%r, 'w').write('pwned')" % str(tmp_path / "pwned"),))

    bad = tmp_path / "evil.pt"
    bad.write_bytes(pickle.dumps(Evil()))
    code, _, err = run(capsys, "rollout", "--checkpoint", str(bad))
    assert one_line_error(code, err) and not (tmp_path / "pwned").exists()


def test_unwritable_output_path_fails_before_work_and_writes_nothing(capsys, tmp_path, checkpoint):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = run(capsys, "rollout", "--checkpoint", str(checkpoint), "--json",
                       str(blocker / "out.json"))
    assert one_line_error(code, err) and "cannot write" in err
    code, _, err = run(capsys, "train", "--steps", "5", "--out", str(blocker / "x.pt"))
    assert one_line_error(code, err)
    assert blocker.read_text() == "" and list(tmp_path.iterdir()) == [blocker]


def test_download_failure_offline_gives_the_build_command(capsys, hopper_dataset, monkeypatch):
    """The remote hub cannot exist here: its failure is simulated at minari's download."""
    import minari

    def offline(dataset_id, download=False):
        if download:
            raise ConnectionError("no network")
        raise FileNotFoundError(dataset_id)

    monkeypatch.setattr(minari, "load_dataset", offline)
    code, _, err = run(capsys, "train", "--env", "ant", "--steps", "5", "--download")
    assert one_line_error(code, err)
    assert "could not download mujoco/ant/medium-v0" in err and "dtmem data build" in err


def test_an_unreachable_minari_remote_fails_in_one_line(capsys, tmp_path, monkeypatch):
    """A real download from a port where nothing listens: huggingface_hub retries five
    times (its waits skipped here), logging each try, and the user sees one line."""
    import logging
    import time

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(time, "sleep", lambda seconds: None)
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    logged = []
    handler = logging.Handler()
    handler.emit = logged.append
    logging.getLogger("huggingface_hub").addHandler(handler)
    try:
        code, _, err = run(capsys, "train", "--dataset", "mujoco/hopper/medium-v0",
                           "--download", "--steps", "1", "--out", str(tmp_path / "dt.pt"))
    finally:
        logging.getLogger("huggingface_hub").removeHandler(handler)
    assert one_line_error(code, err) and "could not download mujoco/hopper/medium-v0" in err
    assert not logged, [record.getMessage() for record in logged]
    assert not (tmp_path / "dt.pt").exists()


def test_every_command_of_the_parser_has_a_handler():
    import argparse

    from dtmem.cli import COMMANDS, make_parser

    def subcommands(parser):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                return action.choices
        return {}

    pairs = set()
    for name, sub in subcommands(make_parser()).items():
        nested = subcommands(sub)
        pairs |= {(name, n) for n in nested} if nested else {(name, None)}
    assert pairs == set(COMMANDS)
    for pair in pairs:  # and its --help prints (argparse chokes on a stray % in help text)
        with pytest.raises(SystemExit) as exit_:
            make_parser().parse_args([p for p in pair if p] + ["--help"])
        assert exit_.value.code == 0


def test_preset_sets_defaults_and_explicit_flags_win():
    from dtmem.cli import make_parser
    from dtmem.command import parse_with_preset
    from dtmem.presets import PRESETS

    parser = make_parser()
    args = parse_with_preset(parser, ["train", "--preset", "lab"], parser.preset_parsers)
    assert args.steps == PRESETS["lab"]["train"]["steps"]
    parser = make_parser()
    args = parse_with_preset(parser, ["train", "--preset", "lab", "--steps", "7"],
                             parser.preset_parsers)
    assert args.steps == 7 and args.n_embd == PRESETS["lab"]["train"]["n_embd"]
    assert main(["train", "--preset", "nope"]) == 2


def test_rollout_films_its_first_episodes(capsys, tmp_path, checkpoint):
    import imageio.v2 as imageio

    assert main(["rollout", "--policy", "window", "--episodes", "3", "--checkpoint",
                 str(checkpoint), "--video", str(tmp_path / "videos"), "--video-episodes", "2",
                 "--json", str(tmp_path / "r.json")]) == 0
    cell = json.loads((tmp_path / "r.json").read_text())
    videos = sorted((tmp_path / "videos").glob("*.mp4"))
    assert len(videos) == 2
    for episode, path in zip(cell["episodes"], videos):
        assert path.name == (f"hopper-medium-window-episode{episode['episode']}-seed"
                             f"{episode['seed']}-score{episode['score']:.1f}-tokens"
                             f"{episode['mean_tokens']:.0f}.mp4")
        # One frame after the reset and one after every step.
        assert imageio.get_reader(path).count_frames() == episode["length"] + 1


def test_what_a_newcomer_types(capsys, checkpoint, tmp_path, monkeypatch):
    from dtmem.memory import POLICIES
    from dtmem.memory.namm import io

    assert main([]) == 2  # plain dtmem: a usage line that says where to look
    err = capsys.readouterr().err
    assert err.startswith("usage: dtmem") and "dtmem list" in err
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(f"\n  {name} " in out for name in POLICIES)
    assert sum(line.split()[0].endswith(("-medium", "-expert"))
               for line in out.splitlines() if line.strip()) == 8
    assert main(["rollout", "--env", "Hopper-v5", "--task", "x"]) == 2  # argparse: one of them
    capsys.readouterr()
    assert main(["rollout", "--task", "mujoco/hopper/medium-v0", "--policy", "window",
                 "--episodes", "2", "--checkpoint", str(checkpoint),
                 "--compare", "recompute"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("hopper-medium window: 2 episodes") and "vs recompute" in out
    assert "no CI" in out  # 2 episodes are too few for one
    monkeypatch.setattr(io, "SHIPPED_DIR", tmp_path)  # no NAMM ships at all
    assert main(["rollout", "--env", "Hopper-v5", "--policy", "namm-local",
                 "--checkpoint", str(checkpoint)]) == 2
    assert "no NAMM evolved on hopper-medium" in capsys.readouterr().err


def test_compare_cells_pairs_two_files_by_seed_and_refuses_other_seeds(capsys, tmp_path,
                                                                       checkpoint):
    from scripts.compare_cells import main as compare

    paths = {}
    for name, argv in (("window", ["--policy", "window"]), ("recompute", []),
                       ("later", ["--seed", "5"])):
        paths[name] = str(tmp_path / f"{name}.json")
        run(capsys, "rollout", "--task", "hopper-medium", "--episodes", "2", "--checkpoint",
            str(checkpoint), "--json", paths[name], *argv)
    assert compare([paths["window"], paths["recompute"]]) == 0
    assert "vs recompute on the same seeds: gain" in capsys.readouterr().out
    assert compare([paths["window"], paths["later"]]) == 2
    assert one_line_error(2, capsys.readouterr().err)
    other_task = json.loads(Path(paths["recompute"]).read_text()) | {"task": "hopper-expert"}
    Path(paths["recompute"]).write_text(json.dumps(other_task))
    assert compare([paths["window"], paths["recompute"]]) == 2
    assert "of two tasks (hopper-medium, hopper-expert)" in capsys.readouterr().err


def test_reproduce_cells_reruns_bit_for_bit_and_keeps_the_reruns_it_is_asked_to(
        capsys, tmp_path, checkpoint):
    from scripts.reproduce_cells import main as reproduce

    cell = tmp_path / "h2o.json"
    run(capsys, "rollout", "--task", "hopper-medium", "--policy", "h2o", "--budget", "20",
        "--episodes", "2", "--checkpoint", str(checkpoint), "--json", str(cell))
    out = tmp_path / "reruns"
    assert reproduce([str(cell), "--out", str(out)]) == 0
    assert "identical (2 episodes)" in capsys.readouterr().out
    rerun = json.loads((out / "hopper-medium" / "h2o@20.json").read_text())
    assert rerun["episodes"] == json.loads(cell.read_text())["episodes"]
    assert "cpu" in rerun["provenance"]["machine"]
    # A re-run already there is kept unless --overwrite, and nothing runs before the check.
    assert reproduce([str(cell), "--out", str(out)]) == 2
    assert one_line_error(2, capsys.readouterr().err)
    tampered = json.loads(cell.read_text())
    tampered["episodes"][0]["ret"] += 1.0
    cell.write_text(json.dumps(tampered))
    assert reproduce([str(cell)]) == 1
    assert "differs in ret" in capsys.readouterr().out
    del tampered["provenance"]["machine"]["cpu"]  # as cells made before CPUs were recorded
    cell.write_text(json.dumps(tampered))
    assert reproduce([str(cell)]) == 1
    assert "(made on a CPU not recorded, run here on" in capsys.readouterr().out
