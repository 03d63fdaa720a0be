"""Hostile input against the real CLI, class by class: every case ends in one line on
stderr with exit code 2 (130 for Ctrl-C), no traceback, and nothing half-written."""

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from dtmem.cli import main
from dtmem.limits import LIMITS
from dtmem.tasks import ROOT


def refused(capsys, argv, needle="", code=2):
    """Run the CLI; it must end in exactly one line on stderr with `code`."""
    result = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert result == code, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert needle in err, err
    return err


# 1. Numbers that are not numbers: every numeric flag of every command, bad values.
NUMERIC_FLAGS = [
    ("rollout", "--episodes"), ("rollout", "--slots"), ("rollout", "--seed"),
    ("rollout", "--budget"), ("rollout", "--ratio"), ("rollout", "--target-return"),
    ("rollout", "--threads"), ("rollout", "--shards"), ("rollout", "--workers"),
    ("train", "--steps"), ("train", "--batch-size"),
    ("train", "--lr"), ("train", "--dropout"), ("train", "--warmup-steps"), ("train", "--seed"),
    ("train", "--n-embd"), ("train", "--grad-clip"), ("train", "--context-steps"),
    ("evolve", "--population"), ("evolve", "--sigma"), ("evolve", "--generations"),
    ("evolve", "--episodes"), ("evolve", "--n-up"), ("evolve", "--seed"), ("evolve", "--workers"),
    ("data build", "--steps"), ("data build", "--seed"), ("data build", "--envs"),
    ("report", "--episodes"), ("namm import x.pt --out y.pt", "--n-up"),
]
BAD_NUMBERS = ["nan", "inf", "-1", "1e400", "99999999999999999999999", "abc"]


NUMBER_CASES = [(command, flag, value) for command, flag in NUMERIC_FLAGS for value in BAD_NUMBERS
                if value != "-1" or LIMITS[flag[2:].replace("-", "_")][1] > -1]


@pytest.mark.parametrize("command, flag, value", NUMBER_CASES)
def test_numbers_that_are_not_numbers(capsys, command, flag, value):
    refused(capsys, [*command.split(), flag, value], "argument " + flag)


# 2. Sizes beyond what the machine holds are refused with the estimate, before any work.
@pytest.mark.parametrize("argv, needle", [
    (["rollout", "--policy", "full", "--episodes", "100000"], "GiB but only"),
    (["train", "--n-embd", "4096", "--n-layer", "48", "--out", "{tmp}/big.pt"], "GiB but only"),
    (["train", "--n-embd", "30", "--n-head", "4", "--out", "{tmp}/odd.pt"], "multiple of"),
    (["train", "--context-steps", "1000", "--batch-size", "64", "--n-layer", "3", "--out",
      "{tmp}/long.pt"], "GiB but only"),  # attention is quadratic in the window
    (["rollout", "--seed", "2147483640", "--episodes", "20"], "past the largest env seed"),
])
def test_sizes_are_bounded(capsys, tmp_path, argv, needle):
    refused(capsys, [a.format(tmp=tmp_path) for a in argv], needle)
    assert not list(tmp_path.iterdir())


# 3. Bad output locations are found before the work.
@pytest.mark.parametrize("where, needle", [
    ("dir", "is a directory"), ("under-file", "is a file, not a folder"),
    ("long", "too long a file name"),
])
@pytest.mark.parametrize("command", [
    ["rollout", "--episodes", "1", "--json"], ["train", "--steps", "1", "--out"],
    ["evolve", "--tasks", "hopper-medium", "--out"],
])
def test_output_locations_are_checked_first(capsys, tmp_path, command, where, needle):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "a-dir").mkdir()
    target = {"dir": tmp_path / "a-dir", "under-file": tmp_path / "a-file" / "out.json",
              "long": tmp_path / ("x" * 300)}[where]
    if command[0] == "evolve" and where == "dir":  # a run directory is meant to be one
        target, needle = tmp_path / "a-file", "is a file, not a folder"
    refused(capsys, [*command, target], needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-dir", "a-file"]


def original_namm(path, var=1.0):
    """A checkpoint as the original code saves one: the CMA-ES mean and the buffers."""
    prefix = "memory_policy.token_embedding.online_output_"
    torch.save({"evolution_state": {"mean": torch.zeros(4172)},
                "buffers": {prefix + "mean": torch.zeros(17), prefix + "var": torch.full((17,), var),
                            prefix + "num": torch.tensor([10.0])}}, path)
    return path


@pytest.mark.parametrize("out, var, needle", [
    ("a-dir", 1.0, "is a directory"),
    ("a-file", 1.0, "already exists; pass --overwrite"),
    ("new.pt", float("nan"), "non-finite values"),
    ("new.pt", -1.0, "negative variances"),
])
def test_namm_import_checks_its_output_and_what_it_would_write(capsys, tmp_path, out, var,
                                                               needle):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "a-dir").mkdir()
    source = original_namm(tmp_path / "original.pt", var)
    refused(capsys, ["namm", "import", source, "--out", tmp_path / out], needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-dir", "a-file", "original.pt"]
    assert (tmp_path / "a-file").read_text() == "x"


def test_namm_inspect_and_report_check_their_output_folders_first(capsys, tmp_path,
                                                                 monkeypatch):
    from dtmem import plots

    (tmp_path / "a-file").write_text("x")
    ran = []
    monkeypatch.setattr(plots, "kept_tokens", lambda *args: ran.append(1))
    refused(capsys, ["namm", "inspect", "--out", tmp_path / "a-file" / "figs"], "is a file")
    assert not ran
    refused(capsys, ["report", "--out", tmp_path / "a-file" / "rep"], "is a file")
    assert capsys.readouterr().out == ""  # no table printed before the refusal
    refused(capsys, ["report", "--confirm", tmp_path / "none"], "is not a folder")
    refused(capsys, ["report", "--results", tmp_path / "a-file"],
            "is a file; give the folder of results files")


@pytest.mark.parametrize("key, value", [("score", float("nan")), ("ret", float("inf")),
                                        ("mean_tokens", "many")])
def test_tables_refuse_non_finite_episodes(capsys, tmp_path, key, value):
    cell = json.loads((ROOT / "results/cells/hopper-medium/recompute.json").read_text())
    cell["episodes"][7][key] = value
    (tmp_path / "hopper-medium").mkdir()
    (tmp_path / "hopper-medium" / "recompute.json").write_text(json.dumps(cell))
    refused(capsys, ["report", "--results", tmp_path, "--any-checkpoint"],
            "non-finite" if value != "many" else "is not a dtmem rollout results file")
    script_refused("compare_cells.py", tmp_path / "hopper-medium" / "recompute.json",
                   ROOT / "results/cells/hopper-medium/recompute.json",
                   needle="recompute.json")


# 3b. Policy settings (--set NAME=VALUE) of the wrong type or range, refused before any episode.
@pytest.mark.parametrize("policy, setting, needle", [
    ("streaming", "sinks=abc", "setting sinks must be a whole number, got 'abc'"),
    ("streaming", "sinks=2.5", "setting sinks must be a whole number"),
    ("streaming", "sinks=-5", "sinks must be from 0"),
    ("streaming", "sinks=100000", "sinks must be from 0"),
    ("h2o", "pyramid=nan", "setting pyramid must be a finite number"),
    ("h2o", "pyramid=NaN", "setting pyramid must be a finite number"),
    ("h2o", "budget=30", "give budget as --budget"),
    ("random", "seed=-1", "seed must be from 0"),
    ("snapkv", "pooling=3", "setting pooling must be text"),
    ("namm", "n_up=abc", "setting n_up must be a whole number"),
])
def test_policy_settings_of_the_wrong_type_or_range(capsys, tmp_path, checkpoint, policy,
                                                    setting, needle):
    refused(capsys, ["rollout", "--episodes", "1", "--checkpoint", checkpoint, "--policy", policy,
                     "--set", setting, "--json", tmp_path / "r.json"], needle)
    assert not (tmp_path / "r.json").exists()


# 3c. Flags that cannot go together, or say what the command would not do.
@pytest.mark.parametrize("argv, needle", [
    (["rollout", "--policy", "h2o", "--namm", "data/namm/default.pt"], "reads none"),
    (["rollout", "--video-episodes", "2"], "give --video"),
    (["rollout", "--episodes", "1", "--video", "{tmp}/v", "--video-episodes", "3"],
     "more than the 1 episodes"),
    (["evolve", "--tasks", "hopper-medium,hopper-medium", "--out", "{tmp}/run"],
     "names a task twice"),
    (["train", "--eval-policy", "namm-local", "--task", "hopper-expert", "--out", "{tmp}/dt.pt"],
     "no NAMM evolved on hopper-expert ships"),
])
def test_flags_that_do_not_fit_together(capsys, tmp_path, monkeypatch, argv, needle):
    from dtmem.memory.namm import io

    monkeypatch.setattr(io, "SHIPPED_DIR", tmp_path / "no-namms")
    refused(capsys, [a.format(tmp=tmp_path) for a in argv], needle)
    assert not list(tmp_path.iterdir())


# 4. Well-formed files with the wrong contents.
def damaged_checkpoint(checkpoint, path, damage):
    payload = torch.load(checkpoint, weights_only=True)
    damage(payload)
    torch.save(payload, path)


CHECKPOINT_DAMAGE = {
    "missing key": (lambda p: p.pop("state_std"), "lacks state_std"),
    "wrong shape": (lambda p: p.update(state_mean=torch.zeros(3)), "state_mean is not"),
    "nan normaliser": (lambda p: p["state_std"].fill_(float("nan")), "non-finite"),
    "zero std": (lambda p: p["state_std"].fill_(0.0), "not positive"),
    "nan weights": (lambda p: next(iter(p["model"].values())).fill_(float("nan")),
                    "non-finite"),
    "huge width": (lambda p: p["config"].update(n_embd=10**9), "n_embd"),
    "huge model": (lambda p: p["config"].update(n_embd=4096, n_layer=48, n_head=1),
                   "GiB but only"),
    "bad config": (lambda p: p["config"].update(n_layer="3"), "n_layer"),
    "not a config": (lambda p: p.update(config=[1, 2]), "not a DT config"),
    "weights not tensors": (lambda p: p.update(model={"a": 1}), "not a dict of tensors"),
    "wrong format": (lambda p: p.update(format="other"), "not a dtmem"),
}


@pytest.mark.parametrize("damage", sorted(CHECKPOINT_DAMAGE))
def test_damaged_checkpoints(capsys, tmp_path, checkpoint, damage):
    fn, needle = CHECKPOINT_DAMAGE[damage]
    damaged_checkpoint(checkpoint, tmp_path / "bad.pt", fn)
    refused(capsys, ["rollout", "--episodes", "1", "--checkpoint", tmp_path / "bad.pt",
                     "--json", tmp_path / "r.json"], needle)
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("content, needle", [
    (b"just some text\n", "corrupt"), (b"PK\x03\x04garbage", "corrupt"), (b"", "corrupt"),
    (b"\x80\x04\x95", "corrupt"),
    # Bytes on which torch's weights-only unpickler raises IndexError and struct.error,
    # and a pickle protocol (106) it warns about before it fails:
    (b"root:x:0:0:root:/root:/bin/bash\n", "corrupt"), (b"X", "corrupt"),
    (b"\x80\x6a)", "corrupt"),
])
def test_files_that_are_not_checkpoints(capsys, recwarn, tmp_path, content, needle):
    (tmp_path / "bad.pt").write_bytes(content)
    refused(capsys, ["rollout", "--checkpoint", tmp_path / "bad.pt"], needle)
    assert not [w for w in recwarn if "pickle" in str(w.message)]  # one line, no warning


def namm_payload():
    return {"format": "dtmem-namm-1", "scorer": "bam", "params": torch.zeros(4172),
            "stats_mean": torch.zeros(17), "stats_var": torch.ones(17), "stats_count": 10,
            "n_up": 48, "meta": {}}


NAMM_DAMAGE = {
    "missing params": (lambda p: p.pop("params"), "lacks params"),
    "impossible n_up": (lambda p: p.update(n_up=40), "n_up"),
    "n_up zero": (lambda p: p.update(n_up=0), "n_up"),
    "nan params": (lambda p: p["params"].fill_(float("nan")), "non-finite"),
    "inf stats": (lambda p: p["stats_mean"].fill_(float("inf")), "non-finite"),
    "negative variance": (lambda p: p["stats_var"].fill_(-1.0), "negative"),
    "stats shape": (lambda p: p.update(stats_var=torch.ones(5)), "stats_var"),
    "bad count": (lambda p: p.update(stats_count=-3), "stats_count"),
    "unknown scorer": (lambda p: p.update(scorer="lstm"), "unknown scorer"),
    "wrong size": (lambda p: p.update(params=torch.zeros(10)), "4172"),
    "meta not dict": (lambda p: p.update(meta=[1]), "meta"),
}


@pytest.mark.parametrize("damage", sorted(NAMM_DAMAGE))
def test_damaged_namm_files(capsys, tmp_path, checkpoint, damage):
    fn, needle = NAMM_DAMAGE[damage]
    payload = namm_payload()
    fn(payload)
    torch.save(payload, tmp_path / "bad.pt")
    refused(capsys, ["rollout", "--policy", "namm", "--namm", tmp_path / "bad.pt",
                     "--checkpoint", checkpoint, "--episodes", "1"], needle)


@pytest.mark.parametrize("argv", [["namm", "inspect", "{missing}"],
                                  ["rollout", "--policy", "namm", "--namm", "{missing}"]])
def test_a_missing_namm_file_gets_a_remedy_every_command_can_follow(capsys, tmp_path, argv):
    """The remedy names no flag: namm inspect, ship and fitness_noise --around have no --namm."""
    argv = [a.format(missing=tmp_path / "none.pt") for a in argv]
    err = refused(capsys, argv, "does not exist; give an existing one")
    assert "--namm" not in err


# 5. Corrupt datasets are reported as such by every command that reads them.
@pytest.fixture
def own_minari_root(tmp_path, monkeypatch):
    from dtmem.data import build_dataset
    from dtmem.tasks import resolve_task

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    build_dataset(resolve_task("hopper"), "medium", 300, 0, 2, progress=False)
    return tmp_path / "minari" / "dtmem" / "hopper" / "medium-v0" / "data"


def truncate(folder):
    data = (folder / "main_data.hdf5").read_bytes()
    (folder / "main_data.hdf5").write_bytes(data[: len(data) // 3])


def flip_bytes(folder):
    data = bytearray((folder / "main_data.hdf5").read_bytes())
    data[:8] = b"\xff" * 8
    (folder / "main_data.hdf5").write_bytes(bytes(data))


def bad_metadata(folder):
    (folder / "metadata.json").write_text("{not json")


def no_metadata(folder):
    (folder / "metadata.json").unlink()


def nan_values(folder):
    with h5py.File(folder / "main_data.hdf5", "r+") as f:
        f["episode_0/observations"][0, 0] = np.nan


def huge_values(folder):
    with h5py.File(folder / "main_data.hdf5", "r+") as f:
        f["episode_0/rewards"][0] = 1e308


@pytest.mark.parametrize("damage, needle", [
    (truncate, "incomplete or corrupt"), (flip_bytes, "incomplete or corrupt"),
    (bad_metadata, "incomplete or corrupt"), (no_metadata, "incomplete or corrupt"),
    (nan_values, "non-finite"), (huge_values, "non-finite"),
])
def test_corrupt_datasets(capsys, tmp_path, own_minari_root, damage, needle):
    damage(own_minari_root)
    refused(capsys, ["train", "--steps", "2", "--out", tmp_path / "dt.pt"], needle)
    assert not (tmp_path / "dt.pt").exists()
    assert main(["data", "list"]) == 0
    listed = capsys.readouterr().out
    hopper = next(line for line in listed.splitlines() if line.startswith("hopper-medium "))
    assert " present" not in hopper or damage in (nan_values, huge_values)


@pytest.mark.parametrize("dataset, root, needle", [
    ("bad id with spaces", "minari", "is not a Minari id"),
    ("noversion", "minari", "is not a Minari id"),
    ("dtmem/walker2d/expert-v0", "minari", "is the dataset of walker2d-expert"),
    ("mujoco/ant/medium-v0", "minari", "is the dataset of ant-medium"),
    ("dtmem/hopper/x-v0", "a-file/minari", "cannot make Minari's dataset folder"),
])
def test_a_build_checks_its_dataset_id_and_folder_before_collecting(
        capsys, tmp_path, monkeypatch, dataset, root, needle):
    from dtmem import data

    (tmp_path / "a-file").write_text("x")
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / root))
    monkeypatch.setattr(data, "collect_episodes", lambda *args: pytest.fail("collected"))
    refused(capsys, ["data", "build", "--steps", "200", "--dataset", dataset], needle)
    assert not list(tmp_path.rglob("*.hdf5"))


def test_an_interrupted_build_leaves_no_dataset_that_looks_present(capsys, tmp_path,
                                                                   monkeypatch):
    import minari

    from dtmem.data import is_local

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    create = minari.create_dataset_from_buffers

    def killed_midway(*args, **kwargs):
        create(*args, **kwargs)  # the files are written...
        raise KeyboardInterrupt  # ...and the process is stopped before it returns

    monkeypatch.setattr(minari, "create_dataset_from_buffers", killed_midway)
    refused(capsys, ["data", "build", "--steps", "200", "--envs", "2"], "interrupted", 130)
    assert not is_local("dtmem/hopper/medium-v0")
    assert not [p for p in (tmp_path / "minari").iterdir() if p.name.startswith(".dtmem-")]


# 6. Run directories are locked; outputs are not replaced unasked.
def test_a_run_directory_in_use_is_refused_and_a_stale_lock_taken_over(capsys, tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "run.lock").write_text(str(sleeper.pid))
        refused(capsys, ["evolve", "--tasks", "hopper-medium", "--out", tmp_path / "run"],
                f"in use by dtmem process {sleeper.pid}")
        refused(capsys, ["train", "--steps", "1", "--out", tmp_path / "run"],
                f"in use by dtmem process {sleeper.pid}")
    finally:
        sleeper.kill()
        sleeper.wait()
    from dtmem.files import lock

    with lock(tmp_path / "run"):  # the owner is gone: the lock is stale and taken over
        assert (tmp_path / "run.lock").read_text() == str(os.getpid())
    assert not (tmp_path / "run.lock").exists()


def test_train_does_not_replace_a_checkpoint_unasked(capsys, tmp_path, checkpoint):
    out = tmp_path / "dt.pt"
    out.write_bytes(checkpoint.read_bytes())
    refused(capsys, ["train", "--steps", "1", "--out", out], "--resume")
    assert out.read_bytes() == checkpoint.read_bytes()


@pytest.mark.parametrize("flags, needle", [
    (["--resume", "--overwrite"], "not allowed with argument"),
    (["--resume", "--out", "{tmp}/none.pt"], "nothing to resume"),
    (["--resume", "--task", "walker2d-expert"],
     "task 'hopper-medium' there, 'walker2d-expert' now"),  # no walker2d dataset is needed
    (["--resume", "--batch-size", "8"], "batch_size 16 there, 8 now"),
])
def test_train_resumes_only_a_checkpoint_of_the_same_run(capsys, tmp_path, checkpoint, flags,
                                                         needle):
    out = tmp_path / "dt.pt"
    out.write_bytes(checkpoint.read_bytes())
    refused(capsys, ["train", "--steps", "30", "--n-layer", "2", "--n-embd", "32",
                     "--eval-every", "0", "--eval-episodes", "2", "--checkpoint-every", "10",
                     "--warmup-steps", "10", "--batch-size", "16", "--out", out,
                     *[f.format(tmp=tmp_path) for f in flags]], needle)
    assert out.read_bytes() == checkpoint.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dt.pt"]


# 7. Interrupted and resumed evolution runs.
@pytest.fixture
def evolved(tmp_path, monkeypatch, checkpoint):
    from dtmem import checkpoints

    shipped = tmp_path / "shipped"
    shipped.mkdir()
    (shipped / "hopper-medium.pt").write_bytes(checkpoint.read_bytes())
    monkeypatch.setattr(checkpoints, "SHIPPED_DIR", shipped)
    out = tmp_path / "run"
    assert main(["evolve", "--tasks", "hopper-medium", "--generations", "2", "--population",
                 "4", "--episodes", "1", "--n-up", "16", "--mean-episodes", "1",
                 "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("flags, needle", [
    (["--population", "8"], "--population 8 (the run has 4)"),
    (["--sigma", "0.5"], "--sigma 0.5"),
    (["--tasks", "hopper-expert"], "drop --tasks"),
])
def test_resume_refuses_changed_settings(capsys, evolved, flags, needle):
    capsys.readouterr()
    refused(capsys, ["evolve", "--resume", evolved, *flags], needle)


@pytest.mark.parametrize("damage, needle", [
    (lambda s: "{truncated", "damaged"),
    (lambda s: json.dumps({**json.loads(s), "history": [{"fitness": [1.0]}]}), "damaged"),
    (lambda s: json.dumps({**json.loads(s), "history": [
        {**json.loads(s)["history"][0], "fitness": [float("nan")] * 4}]}), "damaged"),
    (lambda s: json.dumps({**json.loads(s), "stats": "x"}), "damaged"),
    (lambda s: json.dumps({**json.loads(s), "config": {"stages": 3}}), "damaged"),
    (lambda s: json.dumps({**json.loads(s), "cma_es": {"step_size_rule": "TPA"}}),
     "another CMA-ES recipe"),
])
def test_damaged_state_is_refused(capsys, evolved, damage, needle):
    state = evolved / "state.json"
    state.write_text(damage(state.read_text()))
    capsys.readouterr()
    refused(capsys, ["evolve", "--resume", evolved, "--generations", "2"], needle)


def swap_scorer(path):
    payload = torch.load(path, weights_only=True)
    torch.save({**payload, "scorer": "mlp"}, path)


@pytest.mark.parametrize("name, damage, needle", [
    ("../../elsewhere", None, "is no NAMM name"),
    ("no-such-task", None, "is no NAMM name"),
    ("walker2d-expert", None, "evolved on walker2d-expert alone, but the run evolved bam on "
     "hopper-medium"),
    ("default-mlp", None, "zero-shot mlp NAMM but the run evolved bam"),
    ("default", lambda run: (run / "best.pt").write_text("not torch"), "is corrupt"),
    ("default", lambda run: swap_scorer(run / "latest.pt"), "holds a mlp NAMM"),
    ("default", lambda run: (run / "log.csv").unlink(), "log.csv does not exist"),
])
def test_shipping_checks_the_name_and_the_files_first(capsys, tmp_path, evolved, monkeypatch,
                                                      name, damage, needle):
    from dtmem import evolve

    monkeypatch.setattr(evolve, "SHIPPED_DIR", tmp_path / "namm")
    if damage:
        damage(evolved)
    capsys.readouterr()
    refused(capsys, ["namm", "ship", evolved, "--as", name], needle)
    assert not (tmp_path / "namm").exists() and not (tmp_path / "elsewhere").exists()


def test_shipping_replaces_a_shipped_namm_only_when_asked(capsys, tmp_path, evolved,
                                                          monkeypatch):
    from dtmem import evolve

    monkeypatch.setattr(evolve, "SHIPPED_DIR", tmp_path / "namm")
    assert main(["namm", "ship", str(evolved), "--as", "hopper-medium"]) == 0
    (tmp_path / "namm" / "hopper-medium-log.csv").write_text("an older run's log")
    capsys.readouterr()
    refused(capsys, ["namm", "ship", evolved, "--as", "hopper-medium"], "--overwrite")
    assert (tmp_path / "namm" / "hopper-medium-log.csv").read_text() == "an older run's log"
    assert main(["namm", "ship", str(evolved), "--as", "hopper-medium", "--overwrite"]) == 0
    assert (tmp_path / "namm" / "hopper-medium-log.csv").read_bytes() == \
        (evolved / "log.csv").read_bytes()


def test_ctrl_c_on_evolve_says_what_was_saved(capsys, tmp_path, evolved, monkeypatch):
    from dtmem import evolve

    calls = []
    evaluate = evolve.Evolution.evaluate

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # statistics, generation 0, then Ctrl-C in generation 1
            raise KeyboardInterrupt
        return evaluate(self, *args, **kwargs)

    monkeypatch.setattr(evolve.Evolution, "evaluate", interrupted)
    err = refused(capsys, ["evolve", "--tasks", "hopper-medium", "--generations", "3",
                           "--population", "4", "--episodes", "1", "--n-up", "16",
                           "--mean-episodes", "1", "--out", tmp_path / "r2"], "--resume", 130)
    assert "1 generations are saved" in err
    assert json.loads((tmp_path / "r2" / "state.json").read_text())["history"]
    assert not (tmp_path / "r2.lock").exists()


# 8. Leftovers of killed processes are cleaned by the next write.
def test_stale_temporaries_are_removed(capsys, tmp_path, checkpoint):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".dtmem-{dead.pid}-abc.tmp"
    stale.write_text("half")
    live = tmp_path / f".dtmem-{os.getpid()}-xyz.tmp"
    live.write_text("mine")
    assert main(["rollout", "--episodes", "1", "--checkpoint", str(checkpoint),
                 "--json", str(tmp_path / "r.json")]) == 0
    assert not stale.exists() and live.exists() and (tmp_path / "r.json").exists()


# 9. A full disk ends in one line and leaves nothing behind.
def test_a_full_disk_while_saving_a_checkpoint(capsys, tmp_path, monkeypatch, hopper_dataset):
    import errno

    save = torch.save

    def disk_full(obj, path, *args, **kwargs):
        save(obj, path, *args, **kwargs)  # part of the file reached the disk...
        raise OSError(errno.ENOSPC, "No space left on device")  # ...then the disk filled

    monkeypatch.setattr(torch, "save", disk_full)
    refused(capsys, ["train", "--steps", "2", "--n-layer", "1", "--n-embd", "16",
                     "--eval-every", "0", "--checkpoint-every", "1", "--out",
                     tmp_path / "dt.pt"], "no space left")
    assert not list(tmp_path.iterdir())


def test_a_disk_already_full_is_refused_before_the_work(capsys, tmp_path, monkeypatch):
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=2**19))
    refused(capsys, ["rollout", "--episodes", "1", "--json", tmp_path / "r.json"],
            "0 MiB free, about 1 MiB needed")  # the margin counts as needed
    assert not list(tmp_path.iterdir())


def test_a_full_disk_while_writing_a_dataset(capsys, tmp_path, monkeypatch):
    import errno

    import minari

    from dtmem.data import is_local

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(minari, "create_dataset_from_buffers", disk_full)
    refused(capsys, ["data", "build", "--steps", "200", "--envs", "2"], "no space left")
    assert not is_local("dtmem/hopper/medium-v0")
    assert not [p for p in (tmp_path / "minari").iterdir() if p.name.startswith(".dtmem-")]


def test_training_stops_at_the_first_non_finite_loss(capsys, tmp_path, monkeypatch,
                                                     hopper_dataset):
    from dtmem.checkpoints import read_checkpoint
    from dtmem.model import DecisionTransformer

    forward, calls = DecisionTransformer.forward, []

    def diverging(self, *args):
        calls.append(1)
        out = forward(self, *args)
        return out * float("nan") if len(calls) == 3 else out

    monkeypatch.setattr(DecisionTransformer, "forward", diverging)
    refused(capsys, ["train", "--steps", "5", "--n-layer", "1", "--n-embd", "16",
                     "--eval-every", "0", "--checkpoint-every", "2", "--out",
                     tmp_path / "dt.pt"], "diverged at update 3")
    saved = read_checkpoint(tmp_path / "dt.pt")  # the last save, before the divergence
    assert saved["steps"] == 2 and all(torch.isfinite(w).all() for w in saved["model"].values())


# 10. The scripts of scripts/ end as the dtmem command does: a bad flag in one line.
SCRIPTS = sorted(p.name for p in (ROOT / "scripts").glob("*.py") if p.name != "evolve.py")


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_refuse_a_bad_flag_in_one_line(script):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--no-such-flag"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"{script}: error: unrecognized arguments: --no-such-flag" \
        or "the following arguments are required" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def script_refused(script, *args, needle):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert needle in proc.stderr, proc.stderr


def test_a_sweep_folder_with_a_file_that_is_no_run(tmp_path):
    (tmp_path / "n_up-16.json").write_text('{"config": {"n_up": 16}}')
    script_refused("summarise_sweep.py", tmp_path,
                   needle="n_up-16.json is not an evolution run's state.json")
    assert not (tmp_path / "summary.md").exists()


def test_the_fitness_noise_study_refuses_what_it_cannot_run_or_print(tmp_path):
    script_refused("fitness_noise.py", "--members", "2", needle="argument --members: must be an integer from 4")
    script_refused("fitness_noise.py", "--table", "--out", tmp_path / "none",
                   needle="no populations (*.json) in")
    (tmp_path / "hopper-medium-start.json").write_text("{}")
    script_refused("fitness_noise.py", "--table", "--out", tmp_path,
                   needle="hopper-medium-start.json is not a population of the study")


def test_the_experiment_checks_its_output_before_the_first_cell(tmp_path):
    (tmp_path / "a-file").write_text("x")
    script_refused("run_experiment.py", "--tasks", "hopper-medium", "--out",
                   tmp_path / "a-file" / "exp", needle="is a file, not a folder")
