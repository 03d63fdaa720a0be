"""Hugging Face `transformers` Decision Transformers in and out.

dtmem's model is the architecture of `transformers.DecisionTransformerModel`: the same
(R, s, a) token layout, timestep embedding, embed LayerNorm, pre-LN GPT-2 blocks with
ReLU and tanh action head. A directory of one (config.json plus model.safetensors or
pytorch_model.bin) converts to a dtmem model and back, with the same actions up to float
rounding. Nothing from the directory ever runs: config.json is read as plain JSON, weights
with `safetensors` or torch.load(weights_only=True); `transformers` itself is not needed.

The conversion, HF key -> dtmem key:

    embed_{timestep,return,state,action}.*     -> the same keys
    embed_ln.weight                            -> embed_ln.weight
    embed_ln.bias + encoder.wpe.weight[0]      -> embed_ln.bias   (the fold, see below)
    encoder.h.{i}.ln_1.*, ln_2.*               -> blocks.{i}.ln_1.*, ln_2.*
    encoder.h.{i}.attn.c_attn.{weight^T,bias}  -> blocks.{i}.qkv.*     (q, k, v in order)
    encoder.h.{i}.attn.c_proj.{weight^T,bias}  -> blocks.{i}.proj.*
    encoder.h.{i}.mlp.c_fc.{weight^T,bias}     -> blocks.{i}.mlp.0.*
    encoder.h.{i}.mlp.c_proj.{weight^T,bias}   -> blocks.{i}.mlp.2.*
    encoder.ln_f.*                             -> ln_f.*
    predict_action.0.*                         -> predict_action.0.*

GPT-2's Conv1D stores weights [in, out], nn.Linear [out, in]: hence the transposes (^T).
Not carried over: encoder.wte (HF feeds inputs_embeds, so it is unused), predict_state and
predict_return (auxiliary heads HF's forward returns but no DT acts on), and the causal-mask
buffers attn.bias / attn.masked_bias of older transformers versions. On export the unused
tensors are written as zeros, so that from_pretrained finds every weight it expects.

Where the position embedding goes: HF's DT calls its GPT-2 with position_ids all 0, so
every token gets the same vector wpe[0], added right after the embed LayerNorm:
h = LN(x) + wpe[0] = gamma * norm(x) + (beta + wpe[0]). A LayerNorm's bias is added last,
so folding wpe[0] into beta gives exactly the same function (dtmem applies embed_ln, and
nothing else, before the first block, in both its training forward and its KV-cached
decode). Export writes the bias as it is and wpe = 0, which HF then adds as nothing.

HF directories carry no state normaliser. `import_hf` takes it, in this order, from
`state_stats` (a JSON {"state_mean": [...], "state_std": [...]} or an .npz with the same
arrays: e.g. the statistics an edbeeching model card lists), from the directory's own
dtmem.json (which `export_hf` writes, so a round trip keeps it), or else uses mean 0,
std 1 and says so in its warnings, which the checkpoint's provenance keeps. It never
guesses them from a dtmem dataset of the same task: a model trained on other data (D4RL)
would then run with a plausible-looking but wrong normaliser.
"""

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from dtmem.errors import UserError
from dtmem.files import provenance, relative_to_root, sha256
from dtmem.hf.layout import (
    CONFIG,
    DEFAULT_CONTEXT_STEPS,
    EXPORT_FORMAT,
    N_POSITIONS,
    SAFETENSORS,
    SIDECAR,
    _safetensors,
    hf_config,
    key_map,
)
from dtmem.hf.reading import (
    check_weights,
    find_weights,
    parse_state_stats,
    read_hf_config,
    read_sidecar,
    read_state_stats,
    read_weights,
)
from dtmem.limits import check_value
from dtmem.model import DecisionTransformer


def import_hf(directory, state_stats=None, context_steps=None):
    """(model in eval mode, state_mean, state_std, meta) from a transformers
    DecisionTransformerModel directory. state_stats: a JSON or .npz file (see
    read_state_stats); context_steps: K, the window it was trained on (default: the
    directory's dtmem.json, else 20). meta says where everything came from and carries
    `warnings`."""
    directory = Path(directory)
    cfg, raw, n_positions, vocab_size = read_hf_config(directory)
    sidecar = read_sidecar(directory)
    warnings = []
    if context_steps is None:
        k = sidecar.get("context_steps")
        valid = isinstance(k, int) and not isinstance(k, bool) and 0 < k <= 1000
        context_steps, source_k = (k, SIDECAR) if valid else (DEFAULT_CONTEXT_STEPS, "default")
    else:
        context_steps, source_k = check_value("context_steps", context_steps), "given"
    cfg.context_steps = context_steps

    if state_stats is not None:
        mean, std = read_state_stats(state_stats, cfg.state_dim)
        stats_source = f"from {relative_to_root(state_stats)}"
    elif "state_mean" in sidecar or "state_std" in sidecar:
        mean, std = parse_state_stats(sidecar, str(directory / SIDECAR), cfg.state_dim)
        stats_source = f"from {SIDECAR} in the directory"
    else:
        mean, std = torch.zeros(cfg.state_dim), torch.ones(cfg.state_dim)
        stats_source = "none: mean 0, std 1 (states enter unnormalised)"
        warnings.append("the directory carries no state normaliser, so states are not "
                        "normalised (mean 0, std 1); unless the model was trained so, pass "
                        "--state-stats FILE.json with the state_mean and state_std it was "
                        "trained with (the edbeeching model cards list them)")

    path = find_weights(directory)
    weights = read_weights(path)
    ignored = check_weights(weights, cfg, n_positions, vocab_size, str(path))

    state = {}
    for ours, theirs, conv in key_map(cfg.n_layer):
        tensor = weights[theirs].float()
        state[ours] = (tensor.t() if conv else tensor).contiguous()
    # HF adds wpe[0] to every token right after embed_ln; as the LayerNorm's bias is added
    # last, adding wpe[0] to that bias is the same function (module docstring).
    state["embed_ln.bias"] = state["embed_ln.bias"] + weights["encoder.wpe.weight"][0].float()
    model = DecisionTransformer(cfg)
    model.load_state_dict(state)
    model.eval()
    meta = {
        "source": "Hugging Face transformers DecisionTransformerModel",
        "hf_directory": relative_to_root(directory),
        "hf_model": hub_name(raw, directory),
        "hf_transformers_version": raw.get("transformers_version"),
        "hf_weights": path.name,
        "hf_weights_sha256": sha256(path),
        "position_embedding": "encoder.wpe.weight[0] folded into embed_ln.bias",
        "not_imported": ignored,
        "context_steps": f"{context_steps} ({source_k})",
        "state_stats": stats_source,
        "dataset_id": str(sidecar.get("dataset_id") or f"hf:{hub_name(raw, directory)}"),
        "steps": sidecar.get("steps") if isinstance(sidecar.get("steps"), int) else 0,
        "warnings": warnings,
    }
    return model, mean, std, meta


def hub_name(raw, directory):
    """The model's Hub id ("owner/name") when its config names one, else the directory's
    name (never a local path, which results files must not carry)."""
    name = raw.get("_name_or_path")
    if isinstance(name, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        return name
    return Path(directory).resolve().name


def env_dims(task):
    from dtmem.tasks import make_env

    env = make_env(task)
    try:
        return env.observation_space.shape[0], env.action_space.shape[0]
    finally:
        env.close()


def import_checkpoint(directory, task, out, state_stats=None, context_steps=None,
                      overwrite=False):
    """`dtmem hf import`: check everything that can be checked before reading the weights
    (the output, the config, its fit to the task's env, the statistics file), then convert
    and save a dtmem checkpoint for `task`. Returns the import's meta."""
    from dtmem.checkpoints import save_checkpoint
    from dtmem.files import ensure_new_output

    ensure_new_output(out, overwrite)
    cfg, _, _, _ = read_hf_config(directory)
    dims = env_dims(task)
    if (cfg.state_dim, cfg.act_dim) != dims:
        raise UserError(f"{directory} is a DT for states of {cfg.state_dim} and actions of "
                        f"{cfg.act_dim} dimensions; {task.env_id} has {dims[0]} and {dims[1]}")
    if state_stats is not None:
        read_state_stats(state_stats, cfg.state_dim)
    model, mean, std, meta = import_hf(directory, state_stats, context_steps)
    save_checkpoint(out, model, task=task.name, dataset_id=meta["dataset_id"], state_mean=mean,
                    state_std=std, steps=meta["steps"], provenance=provenance(imported=meta),
                    metrics={})
    return meta


def is_export(directory):
    """Whether `directory` holds what export_hf writes (so that --overwrite may replace it)."""
    try:
        return json.loads((Path(directory) / SIDECAR).read_text()).get("format") == EXPORT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def export_hf(checkpoint, directory, overwrite=False):
    """Write a dtmem checkpoint (a Checkpoint or its path) as a transformers
    DecisionTransformerModel directory: config.json, model.safetensors and dtmem.json
    (the state normaliser, K and origin, which HF's format has no place for). It appears
    whole or not at all; with overwrite it replaces an earlier export, never another folder."""
    from dtmem.checkpoints import Checkpoint

    directory = Path(directory)
    if directory.exists() and not overwrite:
        raise UserError(f"{directory} already exists; pass --overwrite to replace it")
    if directory.exists() and not is_export(directory):
        raise UserError(f"{directory} is not a directory written by dtmem hf export; "
                        "choose another --out")
    st = _safetensors()
    if not isinstance(checkpoint, Checkpoint):
        checkpoint = Checkpoint.load(checkpoint)
    model = checkpoint.model
    cfg = model.cfg
    ours = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    bad = [k for k, v in ours.items() if not torch.isfinite(v).all()]
    if bad:
        raise UserError(f"checkpoint {checkpoint.path}: {bad[0]} has non-finite values")
    tensors = {}
    for key, theirs, conv in key_map(cfg.n_layer):
        tensors[theirs] = (ours[key].t() if conv else ours[key]).contiguous().clone()
    # The constant position embedding is already inside embed_ln.bias: HF adds zero.
    C, S = cfg.n_embd, cfg.state_dim
    tensors.update({"encoder.wpe.weight": torch.zeros(N_POSITIONS, C),
                    "encoder.wte.weight": torch.zeros(1, C),
                    "predict_state.weight": torch.zeros(S, C),
                    "predict_state.bias": torch.zeros(S),
                    "predict_return.weight": torch.zeros(1, C),
                    "predict_return.bias": torch.zeros(1)})
    sidecar = {
        "format": EXPORT_FORMAT,
        "note": "written by dtmem hf export; Hugging Face ignores this file. state_mean and "
                "state_std normalise states before the model sees them: (s - mean) / std.",
        "state_mean": checkpoint.state_mean.float().tolist(),
        "state_std": checkpoint.state_std.float().tolist(),
        "context_steps": cfg.context_steps,
        "task": checkpoint.task, "dataset_id": checkpoint.dataset_id, "steps": checkpoint.steps,
        "source_checkpoint_sha256": checkpoint.sha256,
    }
    old = None  # where an earlier export waits while the new one takes its place
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    except OSError as e:
        raise UserError(f"cannot write {directory}: {e.strerror}; choose a writable path") from None
    try:
        (tmp / CONFIG).write_text(json.dumps(hf_config(cfg), indent=2) + "\n")
        st.save_file(tensors, str(tmp / SAFETENSORS), metadata={"format": "pt"})
        (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=1) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would make the export private
        if directory.exists():  # the earlier export moves aside only once the new one is whole
            old = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.old."))
            os.rename(directory, old / directory.name)
        try:
            os.rename(tmp, directory)
        except OSError:
            if old is not None:
                os.rename(old / directory.name, directory)
            raise
    except OSError as e:
        raise UserError(f"cannot write {directory}: {e.strerror}") from None
    finally:
        for leftover in (tmp, old):
            if leftover is not None and leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)
    return directory
