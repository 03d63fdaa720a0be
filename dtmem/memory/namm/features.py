"""NAMM token features (Cetin et al. 2024, "An Evolved Universal Transformer Memory"),
as pure functions of tensors. Per cached token, layer and head, 25 numbers:
  recency (8): sinusoidal embedding of its age, newest token age 0;
  spectrogram (17): STFT magnitudes of the attention it received from the last n_up
  queries (plus 16 samples carried over), reduced over frames by an EMA and standardised.
"""

import torch

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
    # |z| as hypot of its real and imaginary parts: the same value to 1 ulp, and about 2x
    # faster on CPU than abs() of a complex tensor.
    parts = torch.view_as_real(spec)  # [N, 17, frames, 2]
    return torch.hypot(parts[..., 0], parts[..., 1]).transpose(1, 2)


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


def standardise(values, stats):
    mean, var, _ = stats
    return (values - mean) / torch.clamp_min(torch.sqrt(var), 1e-7)
