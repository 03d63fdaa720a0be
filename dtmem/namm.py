"""Neural Attention Memory Models (Cetin et al. 2024, "An Evolved Universal Transformer
Memory"): the token features and the scoring networks, as pure functions of tensors.
The memory policy that keeps their state in the KV cache is dtmem/memory/namm.py.

Features of a cached token (per layer and head), 25 numbers:
  recency (8): sinusoidal embedding of its age, newest token age 0;
  spectrogram (17): STFT magnitudes of the attention it received from the last n_up
  queries (plus 16 samples carried over), reduced over frames by an EMA and standardised.
"""

import pickle
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F

from dtmem.errors import UserError
from dtmem.files import atomic_path

N_FFT, HOP = 32, 16  # periodic Hann window of 32 samples, hop 16, center=False
N_BINS = N_FFT // 2 + 1  # 17 one-sided frequency bins
N_RECENCY = 8
N_FEATURES = N_RECENCY + N_BINS  # 25, recency first (the published layout)
GAMMA = 0.99  # EMA coefficient per query sample


def spectrogram(signal):
    """signal [N, HOP + n_up] (16 carried-over samples first) -> magnitudes [N, n_up/16, 17]."""
    window = torch.hann_window(N_FFT, periodic=True, dtype=signal.dtype, device=signal.device)
    spec = torch.stft(signal, N_FFT, HOP, window=window, center=False, onesided=True,
                      return_complex=True)  # [N, 17, frames]
    return spec.abs().transpose(1, 2)


def ema_update(state, frames, first_frame):
    """state [N, 17] (zero for new tokens), frames [N, Fr, 17], first_frame [N]: a token
    that arrived during this update counts only the frames from its own arrival on.
    The old state decays by gamma**(16 Fr); frame f weighs gamma16**(Fr-1-f) (1 - gamma16)."""
    n_frames = frames.shape[1]
    per_frame = GAMMA ** HOP
    exponents = torch.arange(n_frames - 1, -1, -1, device=frames.device, dtype=frames.dtype)
    weights = per_frame ** exponents * (1 - per_frame)  # [Fr]
    counted = torch.arange(n_frames, device=frames.device)[None] >= first_frame[:, None]
    return state * per_frame ** n_frames + ((weights * counted)[..., None] * frames).sum(1)


def recency(age):
    """age [...] -> [..., 8]: [sin x4, cos x4] at frequencies 1 / 50000**(k/4)."""
    freqs = 1.0 / 50000 ** (torch.arange(4, device=age.device, dtype=torch.float32) / 4)
    angle = age[..., None].float() * freqs
    return torch.cat([angle.sin(), angle.cos()], dim=-1)


def merge_stats(a, b):
    """Combine running (mean [17], var [17], count) statistics (Chan et al.)."""
    (mean_a, var_a, n_a), (mean_b, var_b, n_b) = a, b
    n = n_a + n_b
    if n == 0:
        return a
    delta = mean_b - mean_a
    mean = mean_a + delta * n_b / n
    var = (var_a * n_a + var_b * n_b + delta**2 * n_a * n_b / n) / n
    return mean, var, n


# BAM: backward attention memory. Flat layout of the published parameter vector, weights
# input-major (index = in * out_dim + out), inputs ordered recency then bins.
BAM_HEAD = 32
BAM_LAYOUT = {
    "qkv_w": (0, 2400, (N_FEATURES, 3 * BAM_HEAD)),
    "qkv_b": (2400, 2496, (3 * BAM_HEAD,)),
    "out_w": (2496, 4096, (BAM_HEAD, 2 * N_FEATURES)),
    "out_b": (4096, 4146, (2 * N_FEATURES,)),
    "read_w": (4146, 4171, (N_FEATURES,)),
    "read_b": (4171, 4172, (1,)),
}
BAM_PARAMS = 4172
# The MLP ablation as the original code builds it with hidden_depth 1: a single linear
# read-out of the 25 features with a bias (no hidden layer, no cross-token view).
MLP_LAYOUT = {
    "w": (0, 25, (N_FEATURES,)),
    "b": (25, 26, (1,)),
}
MLP_PARAMS = 26


def unpack(params, layout):
    """params [B, P] -> dict of [B, *shape] views."""
    return {name: params[:, a:b].reshape(params.shape[0], *shape)
            for name, (a, b, shape) in layout.items()}


def bam_scores(params, x, lengths, chunk_elements=2**24):
    """params [B, 4172], x [B, T, 25]: B groups of tokens in arrival order, the first
    lengths[b] of each real and the rest padding -> scores [B, T] (padding's are junk).

    Backward attention: a token looks at itself and the tokens that arrived after it.
    Reversing each group's real tokens turns that into ordinary causal attention, with no
    T x T mask to build and the masked half skipped; padding stays behind the real tokens,
    where causal attention hides it from them. Groups run in buckets of similar length
    (within a factor of 2, at most chunk_elements in T x T), so that one long group does
    not make every short one pay for its attention."""
    B, T, _ = x.shape
    position = torch.arange(T, device=x.device)
    last = lengths[:, None] - 1
    flip = torch.where(position <= last, last - position, position)  # [B, T], an involution
    order = lengths.argsort(descending=True, stable=True)
    sorted_lengths = lengths[order].tolist()
    scores = x.new_zeros(B, T)
    start = 0
    while start < B:
        longest = max(sorted_lengths[start], 1)
        end = start + 1
        while (end < B and 2 * sorted_lengths[end] > longest
               and (end - start + 1) * longest**2 <= chunk_elements):
            end += 1
        group = order[start:end]
        at = flip[group, :longest]  # [b, longest]: each group's tokens, newest first
        scores[group[:, None], at] = _bam(params[group], x[group[:, None], at])
        start = end
    return scores


def _bam(params, x):
    """x [B, T, 25] newest token first; token i attends to tokens 0..i (itself and newer)."""
    p = unpack(params, BAM_LAYOUT)
    qkv = torch.bmm(x, p["qkv_w"]) + p["qkv_b"][:, None]  # [B, T, 96]
    q, k, v = qkv[:, None].split(BAM_HEAD, dim=-1)  # [B, 1, T, 32] each
    attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)[:, 0]
    out = torch.bmm(attended, p["out_w"]) + p["out_b"][:, None]  # [B, T, 50]
    residual, gate = out.split(N_FEATURES, dim=-1)
    x = x * (1 + gate) + residual
    return (x * p["read_w"][:, None]).sum(-1) + p["read_b"]


def mlp_scores(params, x, lengths=None):
    """The MLP ablation: the same features, each token scored alone by a linear read-out."""
    p = unpack(params, MLP_LAYOUT)
    return (x * p["w"][:, None]).sum(-1) + p["b"]


SCORERS = {"bam": (bam_scores, BAM_PARAMS), "mlp": (mlp_scores, MLP_PARAMS)}
SCORER_POLICIES = {"bam": "namm", "mlp": "namm-mlp"}  # the memory policy running each


def standardise(values, stats):
    mean, var, _ = stats
    return (values - mean) / torch.clamp_min(torch.sqrt(var), 1e-7)


SHIPPED_DIR = Path(__file__).resolve().parent.parent / "data" / "namm"
# The shipped NAMMs behind `--policy namm` and `--policy namm-mlp`.
DEFAULT_FILES = {"namm": "default.pt", "namm-mlp": "default-mlp.pt"}
SHIPPED = SHIPPED_DIR / DEFAULT_FILES["namm"]


def save_namm(path, scorer, params, stats, n_up, meta):
    """A NAMM file: the flat parameter vector, its standardisation statistics, n_up."""
    mean, var, count = stats
    payload = {"format": "dtmem-namm-1", "scorer": scorer, "params": params.detach().cpu(),
               "stats_mean": mean.cpu(), "stats_var": var.cpu(), "stats_count": int(count),
               "n_up": n_up, "meta": meta}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _safe_load(path, what):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, ValueError,
            OSError) as e:
        raise UserError(f"{what} {path} is corrupt or holds more than tensors "
                        f"({type(e).__name__}); nothing from it was run") from None


def _load_payload(path):
    payload = _safe_load(path, "NAMM file")
    if not isinstance(payload, dict) or payload.get("format") != "dtmem-namm-1":
        raise UserError(f"{path} is not a dtmem NAMM file; import an original checkpoint "
                        "with `dtmem namm import`")
    return payload


def namm_policy(path):
    """The memory policy that runs a NAMM file: namm (BAM) or namm-mlp."""
    return SCORER_POLICIES[_load_payload(path)["scorer"]]


def load_namm(path, scorer):
    """(params [P], stats, n_up, meta) from a dtmem NAMM file made for `scorer`."""
    payload = _load_payload(path)
    n_params = SCORERS[scorer][1]
    params = payload["params"]
    if payload["scorer"] != scorer or params.shape != (n_params,):
        raise UserError(f"{path} holds a {payload['scorer']} NAMM of {params.numel()} "
                        f"parameters; policy needs {scorer} with {n_params}")
    stats = (payload["stats_mean"], payload["stats_var"], payload["stats_count"])
    return params.float(), stats, payload["n_up"], payload["meta"]


def import_original(path):
    """(params [4172], stats) from a checkpoint of the original NAMM code: its CMA-ES `mean`
    and the standardisation buffers named *_mean, *_var, *_num (each 17 values)."""
    payload = _safe_load(path, "NAMM checkpoint")
    found = {}

    def walk(node, key=""):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, str(k))
        elif isinstance(node, torch.Tensor):
            if key == "mean" and node.numel() == BAM_PARAMS:
                found["params"] = node.reshape(-1).float()
            for suffix in ("_mean", "_var", "_num"):
                if key.endswith(suffix) and node.numel() in (1, N_BINS):
                    found[suffix] = node.reshape(-1).float()

    walk(payload)
    missing = [k for k in ("params", "_mean", "_var", "_num") if k not in found]
    if missing:
        raise UserError(f"{path} lacks the CMA-ES mean of {BAM_PARAMS} values or the "
                        "normalisation buffers (*_mean, *_var, *_num)")
    return found["params"], (found["_mean"], found["_var"], int(found["_num"].reshape(-1)[0]))
