"""Neural Attention Memory Models (Cetin et al. 2024): features.py (STFT, EMA, recency,
standardisation), scorers.py (BAM, MLP), policy.py (the memory policy), io.py (files)."""

from dtmem.memory.namm.policy import (  # noqa: F401
                                     DEFAULT_N_UP,
                                     NAMM,
                                     NAMMMLP,
                                     policy_for_file,
                                     policy_for_scorer,
)
