"""Reading a transformers DecisionTransformerModel directory safely: config.json as plain
JSON, weights with safetensors or torch.load(weights_only=True), each checked against
the config before anything is built (no code from the directory runs)."""

import json
from dataclasses import asdict, replace
from pathlib import Path

import torch

from dtmem.checkpoints import config_problem
from dtmem.errors import UserError
from dtmem.files import safe_load
from dtmem.hf.layout import (
    ALIASES,
    BIN,
    CONFIG,
    DEFAULT_CONTEXT_STEPS,
    HF_DEFAULTS,
    OPTIONAL,
    SAFETENSORS,
    SIDECAR,
    _ignored_buffer,
    _safetensors,
    hf_shapes,
)
from dtmem.model import DTConfig


def read_hf_config(directory):
    """(DTConfig, raw config dict, n_positions, vocab_size) of a DecisionTransformerModel
    directory, refusing anything dtmem's model does not compute exactly."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory} is not a directory; pass a Hugging Face model directory "
                        f"(config.json and {SAFETENSORS} or {BIN})")
    path = directory / CONFIG
    if not path.is_file():
        raise UserError(f"{directory} has no {CONFIG}; it is not a Hugging Face model directory")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not readable JSON ({type(e).__name__})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} is not a JSON object ({type(raw).__name__}); it is not a "
                        f"Hugging Face model config")
    if raw.get("model_type") is None:
        raise UserError(f"{path} describes no model_type; a DecisionTransformerModel's config "
                        f"says \"model_type\": \"decision_transformer\"")
    if raw["model_type"] != "decision_transformer":
        raise UserError(f"{path} describes a {raw['model_type']!r} model, not a "
                        f"decision_transformer")

    def get(key):
        if key in raw:
            return raw[key]
        return raw.get(ALIASES.get(key, key), HF_DEFAULTS[key])

    sizes = {}
    for key in ("n_positions", "vocab_size"):
        value = get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise UserError(f"{path}: {key} must be a positive integer, got {value!r}")
        sizes[key] = value
    # The checks of a dtmem checkpoint, so that nothing imports that could not load after.
    cfg = DTConfig(state_dim=get("state_dim"), act_dim=get("act_dim"),
                   context_steps=DEFAULT_CONTEXT_STEPS, n_layer=get("n_layer"),
                   n_head=get("n_head"), n_embd=get("hidden_size"),
                   dropout=get("resid_pdrop"), max_timestep=get("max_ep_len"))
    problem = config_problem(asdict(cfg))
    if problem:
        raise UserError(f"{path}: read as dtmem's DT (n_embd is hidden_size, max_timestep is "
                        f"max_ep_len, dropout is resid_pdrop), {problem}; dtmem cannot run it")
    C = cfg.n_embd
    # What dtmem's model computes: refuse the rest rather than act differently.
    unsupported = {
        "activation_function": (get("activation_function"), "relu"),
        "action_tanh": (get("action_tanh"), True),
        "n_inner": (get("n_inner"), None if get("n_inner") is None else 4 * C),
        "layer_norm_epsilon": (get("layer_norm_epsilon"), 1e-5),
        "scale_attn_weights": (get("scale_attn_weights"), True),
        "scale_attn_by_inverse_layer_idx": (get("scale_attn_by_inverse_layer_idx"), False),
        "add_cross_attention": (get("add_cross_attention"), False),
    }
    for key, (value, wanted) in unsupported.items():
        if value != wanted:
            raise UserError(f"{path}: {key} = {value!r} is not supported (dtmem's DT needs "
                            f"{wanted!r})")
    return replace(cfg, dropout=float(cfg.dropout)), raw, sizes["n_positions"], \
        sizes["vocab_size"]


def read_sidecar(directory):
    """The directory's dtmem.json (written by export_hf), or {}."""
    path = Path(directory) / SIDECAR
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not readable JSON ({type(e).__name__}); delete it or "
                        "pass --state-stats") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON object; delete it or pass --state-stats")
    return data


def _stats_vector(values, name, where, state_dim):
    try:
        vector = torch.as_tensor(values, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise UserError(f"{where}: {name} must be a list of {state_dim} numbers") from None
    if vector.shape != (state_dim,):
        raise UserError(f"{where}: {name} has shape {tuple(vector.shape)}; the model's states "
                        f"have {state_dim} dimensions")
    if not torch.isfinite(vector).all():
        raise UserError(f"{where}: {name} has non-finite values")
    return vector.float()


def parse_state_stats(data, where, state_dim):
    """(mean, std) from a mapping with state_mean and state_std, checked."""
    missing = [k for k in ("state_mean", "state_std") if k not in data]
    if missing:
        raise UserError(f"{where} lacks {' and '.join(missing)}; it needs "
                        '{"state_mean": [...], "state_std": [...]}')
    mean = _stats_vector(data["state_mean"], "state_mean", where, state_dim)
    std = _stats_vector(data["state_std"], "state_std", where, state_dim)
    if not (std > 0).all():
        raise UserError(f"{where}: state_std must be positive everywhere")
    return mean, std


def read_state_stats(path, state_dim):
    """(mean, std) from a JSON file {"state_mean": [...], "state_std": [...]} or an .npz
    holding arrays of those names (loaded without pickles)."""
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise UserError(f"state statistics file {path} does not exist; write "
                        '{"state_mean": [...], "state_std": [...]} as JSON')
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                data = {k: npz[k].tolist() for k in npz.files}
        else:
            data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"state statistics file {path} is not readable JSON or .npz "
                        f"({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON object with state_mean and state_std")
    return parse_state_stats(data, str(path), state_dim)


def find_weights(directory):
    directory = Path(directory)
    for name in (SAFETENSORS, BIN):
        if (directory / name).is_file():
            return directory / name
    for name in (SAFETENSORS + ".index.json", BIN + ".index.json"):
        if (directory / name).is_file():
            raise UserError(f"{directory} holds sharded weights ({name}); dtmem reads one "
                            f"{SAFETENSORS} or {BIN}: save the model unsharded")
    raise UserError(f"{directory} has {CONFIG} but no {SAFETENSORS} or {BIN}")


def read_weights(path):
    """The state dict of a weights file; no code from it runs."""
    path = Path(path)
    if path.name.endswith(".safetensors"):
        st = _safetensors()
        from safetensors import SafetensorError

        try:
            weights = st.load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise UserError(f"{path} is not a readable safetensors file "
                            f"({type(e).__name__})") from None
    else:
        weights = safe_load(path, "Hugging Face weights file",
                            f"save the model again, ideally as {SAFETENSORS}")
    if not isinstance(weights, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()):
        raise UserError(f"{path} is not a flat state dict of named tensors")
    return weights


def check_weights(weights, cfg, n_positions, vocab_size, where):
    """Every tensor dtmem needs, of the right shape, floating point and finite; nothing
    unknown. Returns the keys left unused."""
    expected = hf_shapes(cfg, n_positions, vocab_size)
    unknown = sorted(k for k in weights if k not in expected and not _ignored_buffer(k))
    if unknown:
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        raise UserError(f"{where} holds tensors a DecisionTransformerModel does not have: "
                        f"{', '.join(unknown[:3])}{more}")
    missing = sorted(k for k in expected if k not in weights and k not in OPTIONAL)
    if missing:
        raise UserError(f"{where} lacks {missing[0]}" + (f" and {len(missing) - 1} more tensors"
                                                         if len(missing) > 1 else ""))
    for key, shape in expected.items():
        if key not in weights:
            continue
        tensor = weights[key]
        if tuple(tensor.shape) != shape:
            raise UserError(f"{where}: {key} has shape {tuple(tensor.shape)} but config.json "
                            f"implies {shape}")
        if not tensor.is_floating_point():
            raise UserError(f"{where}: {key} is {tensor.dtype}, not floating point")
        # Of GPT-2's position table only row 0 is used; unused tensors are not checked.
        used = tensor[:1] if key == "encoder.wpe.weight" else tensor
        if key not in OPTIONAL and not torch.isfinite(used).all():
            raise UserError(f"{where}: {key} has non-finite values (NaN or inf)")
    return sorted(k for k in weights if k in OPTIONAL or _ignored_buffer(k))
