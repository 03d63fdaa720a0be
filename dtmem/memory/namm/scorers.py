"""NAMM scoring networks: one flat parameter vector per group of tokens (per population
member in evolution), so that CMA-ES can search them as plain vectors."""

import torch
import torch.nn.functional as F

from dtmem.memory.namm.features import N_FEATURES

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
