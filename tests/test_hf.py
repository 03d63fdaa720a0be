"""Hugging Face DecisionTransformerModel directories in and out: the same actions as
transformers' own forward both ways, every memory policy on an imported DT, and every kind
of bad input as one line on stderr, exit code 2, nothing written."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import DecisionTransformerConfig, DecisionTransformerModel

from dtmem.checkpoints import Checkpoint
from dtmem.cli import main
from dtmem.hf import import_hf
from dtmem.memory import POLICIES, PolicySpec
from dtmem.memory.namm.io import save_namm

STATE_DIM, ACT_DIM = 11, 3  # Hopper-v5


def hf_model(seed=0, **overrides):
    """A random DecisionTransformerModel (2 layers, 32 wide, 2 heads) whose LayerNorms and
    position embedding are far from their initial values, so that each mapping matters."""
    settings = {"state_dim": STATE_DIM, "act_dim": ACT_DIM, "hidden_size": 32, "n_layer": 2,
                "n_head": 2, "max_ep_len": 1000, "action_tanh": True}
    torch.manual_seed(seed)
    model = DecisionTransformerModel(DecisionTransformerConfig(**{**settings, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def inputs(batch=3, steps=12, state_dim=STATE_DIM, act_dim=ACT_DIM, seed=1, start=True):
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(batch, steps, state_dim, generator=g)
    actions = torch.rand(batch, steps, act_dim, generator=g) * 2 - 1
    rtg = torch.randn(batch, steps, 1, generator=g)
    first = torch.zeros(batch, 1, dtype=torch.long) if start else \
        torch.randint(0, 1000 - steps, (batch, 1), generator=g)
    return rtg, states, actions, first + torch.arange(steps)


def hf_actions(model, rtg, states, actions, timesteps):
    with torch.no_grad():
        return model(states=states, actions=actions, returns_to_go=rtg, timesteps=timesteps,
                     return_dict=True).action_preds


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err):
    return code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf") / "dt"
    hf_model().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def stats_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("stats") / "stats.json"
    g = torch.Generator().manual_seed(2)
    path.write_text(json.dumps({"state_mean": torch.randn(STATE_DIM, generator=g).tolist(),
                                "state_std": (torch.rand(STATE_DIM, generator=g) + 0.5).tolist()}))
    return path


@pytest.fixture(scope="module")
def imported(hf_dir, stats_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("imported") / "hf-hopper.pt"
    assert main(["hf", "import", str(hf_dir), "--task", "hopper-medium", "--out", str(out),
                 "--state-stats", str(stats_file)]) == 0
    return out


def test_import_acts_as_transformers_does_in_forward_and_kv_decode(hf_dir):
    reference = DecisionTransformerModel.from_pretrained(hf_dir).eval()
    model, mean, std, meta = import_hf(hf_dir)
    assert meta["warnings"] and (mean == 0).all() and (std == 1).all()
    for start in (True, False):  # episodes from t = 0, and windows from later timesteps
        batch = inputs(start=start)
        expected = hf_actions(reference, *batch)
        with torch.no_grad():
            assert torch.allclose(model(*batch), expected, atol=1e-5, rtol=0)
    # The KV-cached decode, one env step at a time, gives the same actions.
    rtg, states, actions, timesteps = inputs()
    expected = hf_actions(reference, rtg, states, actions, timesteps)
    cache = model.new_cache(3, capacity=3 * 12)
    active = torch.ones(3, dtype=torch.bool)
    for t in range(12):
        previous = actions[:, t - 1] if t else torch.zeros(3, ACT_DIM)
        got, _ = model.decode(cache, previous, rtg[:, t], states[:, t], timesteps[:, t], active)
        assert torch.allclose(got, expected[:, t], atol=1e-5, rtol=0)
    # HF's constant position embedding really is in the bias: without it actions differ.
    wpe0 = reference.encoder.wpe.weight[0]
    assert torch.allclose(model.embed_ln.bias, reference.embed_ln.bias + wpe0)
    assert wpe0.abs().max() > 0.1


def test_pytorch_model_bin_of_older_transformers_imports_the_same(hf_dir, tmp_path):
    weights = load_file(hf_dir / "model.safetensors")
    for i in range(2):  # the causal-mask buffers transformers 4.x saved
        weights[f"encoder.h.{i}.attn.bias"] = torch.ones(1, 1, 1024, 1024).tril()
        weights[f"encoder.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    directory = tmp_path / "old"
    directory.mkdir()
    shutil.copy(hf_dir / "config.json", directory)
    torch.save(weights, directory / "pytorch_model.bin")
    from_bin, *_ = import_hf(directory)
    from_safetensors, *_ = import_hf(hf_dir)
    for key, value in from_safetensors.state_dict().items():
        assert torch.equal(from_bin.state_dict()[key], value), key


def test_export_loads_in_transformers_with_the_same_actions_and_imports_back(
        capsys, checkpoint, tmp_path):
    directory = tmp_path / "export"
    code, _, err = run(capsys, "hf", "export", checkpoint, "--out", directory)
    assert code == 0, err
    ours = Checkpoint.load(checkpoint)
    reference = DecisionTransformerModel.from_pretrained(directory).eval()
    for start in (True, False):
        batch = inputs(start=start)
        with torch.no_grad():
            assert torch.allclose(ours.model(*batch), hf_actions(reference, *batch),
                                  atol=1e-5, rtol=0)
    sidecar = json.loads((directory / "dtmem.json").read_text())
    assert torch.equal(torch.tensor(sidecar["state_mean"]), ours.state_mean)
    # Back again: dtmem.json brings the normaliser and K along, no warning.
    back = tmp_path / "back.pt"
    code, _, err = run(capsys, "hf", "import", directory, "--task", "hopper-medium",
                       "--out", back)
    assert code == 0 and "warning" not in err, err
    again = Checkpoint.load(back)
    assert torch.equal(again.state_mean, ours.state_mean)
    assert torch.equal(again.state_std, ours.state_std)
    assert again.model.cfg == ours.model.cfg and again.dataset_id == ours.dataset_id
    for key, value in ours.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[key], value), key


def test_import_records_where_the_normaliser_came_from(capsys, imported, stats_file, hf_dir,
                                                      tmp_path):
    checkpoint = Checkpoint.load(imported)
    stats = json.loads(stats_file.read_text())
    assert torch.equal(checkpoint.state_mean, torch.tensor(stats["state_mean"]))
    record = checkpoint.provenance["imported"]
    assert record["warnings"] == [] and "stats.json" in record["state_stats"]
    assert checkpoint.task == "hopper-medium" and checkpoint.model.cfg.context_steps == 20
    # Without statistics: mean 0, std 1, a warning on stderr and in the provenance.
    out = tmp_path / "plain.pt"
    code, _, err = run(capsys, "hf", "import", hf_dir, "--task", "hopper-medium", "--out", out,
                       "--context-steps", "30")
    assert code == 0 and "warning" in err and "--state-stats" in err
    plain = Checkpoint.load(out)
    assert plain.provenance["imported"]["warnings"] and (plain.state_std == 1).all()
    assert plain.model.cfg.context_steps == 30


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_imported_dt_runs_with_every_policy(capsys, tmp_path, imported, policy):
    cls = POLICIES[policy]
    extra = ["--budget", "30"] if cls.takes_budget else []
    if "namm_file" in cls.__dataclass_fields__:  # a NAMM file of small random parameters
        params = torch.randn(cls.n_params, generator=torch.Generator().manual_seed(0))
        save_namm(tmp_path / "n.pt", cls.scorer, params * 0.1,
                  (torch.zeros(17), torch.ones(17), 1), 48, {})
        extra += ["--namm", tmp_path / "n.pt"]
    out = tmp_path / "r.json"
    code, _, err = run(capsys, "rollout", "--task", "hopper-medium", "--policy", policy,
                       "--episodes", "1", "--checkpoint", imported, "--json", out, *extra)
    assert code == 0, err
    result = json.loads(out.read_text())
    assert len(result["episodes"]) == 1 and result["episodes"][0]["length"] >= 1
    assert result["dataset_id"] == "hf:dt"
    spec = PolicySpec(policy, 30 if cls.takes_budget else None,
                      options={"namm_file": tmp_path / "n.pt"} if "--namm" in extra else {})
    assert result["summary"]["max_tokens"] <= spec.build(20, 3000).max_held()


def edit_config(directory, **changes):
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **changes}))


def edit_weights(directory, **changes):
    weights = load_file(directory / "model.safetensors")
    for key, value in changes.items():
        weights[key.replace("__", ".")] = value
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})


def no_config(d):
    (d / "config.json").unlink()


def wrong_dims(d):  # a HalfCheetah-sized DT (17 / 6) imported for Hopper
    shutil.rmtree(d)
    hf_model(state_dim=17, act_dim=6).save_pretrained(d)


def nan_weight(d):
    weight = load_file(d / "model.safetensors")["encoder.h.1.mlp.c_fc.weight"]
    weight[3, 5] = float("nan")
    edit_weights(d, encoder__h__1__mlp__c_fc__weight=weight)


IMPORT_ERRORS = {
    "no config.json": (no_config, [], "has no config.json"),
    "not a decision transformer": (lambda d: edit_config(d, model_type="gpt2"), [],
                                   "not a decision_transformer"),
    "unreadable config": (lambda d: (d / "config.json").write_text("{"), [], "not readable JSON"),
    "config not an object": (lambda d: (d / "config.json").write_text("[1, 2]"), [],
                             "not a JSON object"),
    "no model type": (lambda d: edit_config(d, model_type=None), [], "describes no model_type"),
    # Every size a dtmem checkpoint bounds is bounded at import too:
    "a million layers": (lambda d: edit_config(d, n_layer=10**6), [],
                         "n_layer = 1000000 is outside 1..48"),
    "too many heads": (lambda d: edit_config(d, n_head=128), [], "n_head = 128 is outside"),
    "too wide": (lambda d: edit_config(d, hidden_size=8192), [], "n_embd = 8192 is outside"),
    "huge max_ep_len": (lambda d: edit_config(d, max_ep_len=10**12), [],
                        "max_timestep = 1000000000000 is outside"),
    "heads do not divide the width": (lambda d: edit_config(d, n_head=3), [],
                                      "n_embd is not a multiple of n_head"),
    "dropout of one": (lambda d: edit_config(d, resid_pdrop=1.0), [],
                       "dropout = 1.0 is outside [0, 1)"),
    # Checked against the weights without building the table it implies (1.3 GB):
    "max_ep_len at the bound": (lambda d: edit_config(d, max_ep_len=10**7), [],
                                "implies (10000000, "),
    "gelu": (lambda d: edit_config(d, activation_function="gelu_new"), [], "not supported"),
    "no tanh": (lambda d: edit_config(d, action_tanh=False), [], "not supported"),
    "no weights": (lambda d: (d / "model.safetensors").unlink(), [], "no model.safetensors"),
    "corrupt weights": (lambda d: (d / "model.safetensors").write_bytes(b"\0" * 64), [],
                        "not a readable safetensors"),
    "shape mismatch": (lambda d: edit_weights(d, embed_state__weight=torch.zeros(32, 12)), [],
                       "has shape (32, 12)"),
    "config disagrees with weights": (lambda d: edit_config(d, hidden_size=64), [],
                                      "config.json implies"),
    "unknown tensor": (lambda d: edit_weights(d, encoder__h__0__adapter=torch.zeros(3)), [],
                       "does not have"),
    "non-finite weight": (nan_weight, [], "non-finite"),
    "dims do not fit the task": (wrong_dims, [], "Hopper-v5 has 11 and 3"),
    "stats of the wrong length": (None, ["--state-stats", "{short}"], "has shape (2,)"),
    "stats file missing": (None, ["--state-stats", "{missing}"], "does not exist"),
    "unknown task": (None, ["--task", "hopper-legendary"], "unknown task"),
    "output exists": (None, ["--out", "{existing}"], "already exists"),
}


@pytest.mark.parametrize("case", sorted(IMPORT_ERRORS))
def test_import_errors_are_one_line_and_write_nothing(capsys, hf_dir, tmp_path, case):
    damage, extra, message = IMPORT_ERRORS[case]
    directory = tmp_path / "dt"
    shutil.copytree(hf_dir, directory)
    if damage:
        damage(directory)
    capsys.readouterr()  # transformers' progress bar, if damage saved a model
    (tmp_path / "short.json").write_text(json.dumps({"state_mean": [0, 0], "state_std": [1, 1]}))
    (tmp_path / "existing.pt").write_text("")
    paths = {name: tmp_path / f"{name}.{'pt' if name == 'existing' else 'json'}"
             for name in ("short", "missing", "existing")}
    extra = [a.format(**paths) for a in extra]
    args = {"--task": "hopper-medium", "--out": str(tmp_path / "out.pt")}
    for flag, value in zip(extra[::2], extra[1::2]):
        args[flag] = value
    argv = ["hf", "import", directory] + [x for item in args.items() for x in item]
    code, _, err = run(capsys, *argv)
    assert one_line_error(code, err) and message in err, err
    assert not (tmp_path / "out.pt").exists()
    assert (tmp_path / "existing.pt").read_text() == ""


def test_export_errors_are_one_line_and_write_nothing(capsys, checkpoint, tmp_path):
    existing = tmp_path / "existing"
    existing.mkdir()
    code, _, err = run(capsys, "hf", "export", checkpoint, "--out", existing)
    assert one_line_error(code, err) and "already exists; pass --overwrite" in err
    assert list(existing.iterdir()) == []
    (existing / "notes.txt").write_text("mine")  # a folder export did not write stays
    code, _, err = run(capsys, "hf", "export", checkpoint, "--out", existing, "--overwrite")
    assert one_line_error(code, err) and "not a directory written by dtmem hf export" in err
    assert [p.name for p in existing.iterdir()] == ["notes.txt"]
    (existing / "notes.txt").unlink()
    code, _, err = run(capsys, "hf", "export", tmp_path / "none.pt", "--out", tmp_path / "x")
    assert one_line_error(code, err) and "does not exist" in err
    assert not (tmp_path / "x").exists()
    code, _, err = run(capsys, "hf", "export", checkpoint)
    assert code == 2 and "--out" in err
    assert [p.name for p in tmp_path.iterdir()] == ["existing"]  # no temporary left behind


def test_overwrite_replaces_an_earlier_export_and_import_whole(capsys, checkpoint, tmp_path):
    """--overwrite swaps in a whole new export (nothing of the old one, no temporary left)
    and a whole new checkpoint; without it both are refused (the tests above)."""
    directory, back = tmp_path / "export", tmp_path / "back.pt"
    assert run(capsys, "hf", "export", checkpoint, "--out", directory)[0] == 0
    (directory / "stale.txt").write_text("from before")
    code, _, err = run(capsys, "hf", "export", checkpoint, "--out", directory, "--overwrite")
    assert code == 0, err
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        ["config.json", "model.safetensors", "dtmem.json"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    back.write_text("an older file")
    code, _, err = run(capsys, "hf", "import", directory, "--task", "hopper-medium",
                       "--out", back, "--overwrite")
    assert code == 0, err
    assert torch.equal(Checkpoint.load(back).state_mean, Checkpoint.load(checkpoint).state_mean)
