"""How a transformers DecisionTransformerModel directory maps onto dtmem's DT: file names,
HF's config defaults, the key map and the tensor shapes (see dtmem/hf/__init__.py)."""

import torch

from dtmem.errors import UserError
from dtmem.model import DecisionTransformer, DTConfig

CONFIG = "config.json"


SAFETENSORS = "model.safetensors"


BIN = "pytorch_model.bin"


SIDECAR = "dtmem.json"  # what dtmem knows beyond HF's config: normaliser, K, origin
EXPORT_FORMAT = "dtmem-hf-1"  # the sidecar's "format": marks a directory dtmem hf export wrote


INSTALL = 'pip install "dtmem[hf]"'


DEFAULT_CONTEXT_STEPS = 20  # K of the DT paper's MuJoCo runs and of HF's DT training example


N_POSITIONS = 1024  # rows of GPT-2's position table in an exported config (only row 0 is used)


# transformers' DecisionTransformerConfig defaults, for keys a config.json leaves out.
HF_DEFAULTS = {"state_dim": 17, "act_dim": 4, "hidden_size": 128, "max_ep_len": 4096,
               "action_tanh": True, "vocab_size": 1, "n_positions": 1024, "n_layer": 3,
               "n_head": 1, "n_inner": None, "activation_function": "relu",
               "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1,
               "layer_norm_epsilon": 1e-5, "scale_attn_weights": True,
               "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False}


ALIASES = {"n_positions": "max_position_embeddings", "n_head": "num_attention_heads",
           "n_layer": "num_hidden_layers"}  # DecisionTransformerConfig.attribute_map


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise UserError(f"Hugging Face model.safetensors files need the safetensors package: "
                        f"{INSTALL}") from None
    return safetensors.torch


def key_map(n_layer):
    """(dtmem key, HF key, transposed) for every dtmem parameter. embed_ln.bias also takes
    HF's encoder.wpe.weight[0] (see the module docstring)."""
    same = [f"{name}.{p}" for name in ("embed_return", "embed_state", "embed_action",
                                       "embed_ln", "predict_action.0") for p in ("weight", "bias")]
    rows = [("embed_timestep.weight", "embed_timestep.weight", False)]
    rows += [(key, key, False) for key in same]
    for i in range(n_layer):
        for ours, theirs, conv in (("ln_1", "ln_1", False), ("qkv", "attn.c_attn", True),
                                   ("proj", "attn.c_proj", True), ("ln_2", "ln_2", False),
                                   ("mlp.0", "mlp.c_fc", True), ("mlp.2", "mlp.c_proj", True)):
            rows.append((f"blocks.{i}.{ours}.weight", f"encoder.h.{i}.{theirs}.weight", conv))
            rows.append((f"blocks.{i}.{ours}.bias", f"encoder.h.{i}.{theirs}.bias", False))
    rows += [(f"ln_f.{p}", f"encoder.ln_f.{p}", False) for p in ("weight", "bias")]
    return rows


def hf_shapes(cfg: DTConfig, n_positions, vocab_size):
    """Every tensor of a DecisionTransformerModel's state dict and its shape."""
    # On the meta device: shapes without memory, whatever sizes config.json claims.
    with torch.device("meta"):
        state = DecisionTransformer(cfg).state_dict()
    shapes = {}
    for ours, theirs, conv in key_map(cfg.n_layer):
        shape = tuple(state[ours].shape)
        shapes[theirs] = shape[::-1] if conv else shape
    C, S = cfg.n_embd, cfg.state_dim
    shapes.update({"encoder.wpe.weight": (n_positions, C), "encoder.wte.weight": (vocab_size, C),
                   "predict_state.weight": (S, C), "predict_state.bias": (S,),
                   "predict_return.weight": (1, C), "predict_return.bias": (1,)})
    return shapes


OPTIONAL = ("encoder.wte.weight", "predict_state.weight", "predict_state.bias",
            "predict_return.weight", "predict_return.bias")


def _ignored_buffer(key):
    # Causal-mask buffers that transformers 4.x saved with GPT-2 attention.
    parts = key.split(".")
    return len(parts) == 5 and parts[:2] == ["encoder", "h"] and parts[3] == "attn" \
        and parts[4] in ("bias", "masked_bias")


def hf_config(cfg: DTConfig):
    """config.json of the DecisionTransformerModel that computes what `cfg`'s model does."""
    return {
        "architectures": ["DecisionTransformerModel"], "model_type": "decision_transformer",
        "state_dim": cfg.state_dim, "act_dim": cfg.act_dim, "hidden_size": cfg.n_embd,
        "max_ep_len": cfg.max_timestep, "action_tanh": True, "vocab_size": 1,
        "n_positions": N_POSITIONS, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
        "n_inner": None, "activation_function": "relu", "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout, "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02, "scale_attn_weights": True, "use_cache": True,
        "bos_token_id": None, "eos_token_id": None,
        "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "add_cross_attention": False, "dtype": "float32",
    }
