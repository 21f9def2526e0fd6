"""Which bank images perturb an input: N distinct draws per input, decided by the input itself.

STRIP (Gao et al.) draws the N superimposed images at random. Served to untrusted clients, fresh
random draws per request let an attacker resend a stamped input until one draw lets it pass.
Here the draws are a deterministic function of the input's bytes and the detector's key:

    seed_i = blake2b(bytes(x_i), key)                      (64 bits per input)
    u_ij   = splitmix64(seed_i + j * phi)                  (j-th candidate, phi = 2^64 / golden ratio)
    idx_ij = u_ij mod pool                                 (redrawn with later j on a repeat)

so the same input always meets the same N bank images, and so gets the same score and verdict,
whatever else is in its batch. The draws stay uniform over the bank for inputs the attacker does
not control bit for bit; changing one pixel gives a fresh draw, which is no worse than the
paper's per-request draws. When the bank scores itself at calibration, image i is never drawn
for itself (`exclude`).
"""
from __future__ import annotations

import hashlib

import numpy as np

PHI = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def splitmix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's output function on uint64 arrays (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = z + PHI
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def input_seeds(x: np.ndarray, key: bytes) -> np.ndarray:
    """One 64-bit seed per input: blake2b of its float32 bytes, keyed by the detector."""
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(len(x), -1)
    return np.fromiter((int.from_bytes(hashlib.blake2b(row, digest_size=8, key=key).digest(), "little")
                        for row in flat), dtype=np.uint64, count=len(flat))


def detector_key(seed: int, model_sha256: str) -> bytes:
    """The draws' key: fixed by the detector's seed and the model it was calibrated on."""
    return hashlib.blake2b(f"trojan-gate/strip|{int(seed)}|{model_sha256}".encode(), digest_size=16).digest()


def _candidates(seeds: np.ndarray, start: int, count: int, pool: int) -> np.ndarray:
    j = np.arange(start, start + count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return (splitmix64(seeds[:, None] + j[None, :] * PHI) % np.uint64(pool)).astype(np.int64)


def keyed_indices(seeds: np.ndarray, n_bank: int, n_draws: int, exclude: np.ndarray | None = None) -> np.ndarray:
    """(n, n_draws) bank indices, distinct within each row, a function of each row's seed alone;
    row i never holds exclude[i]."""
    seeds = np.asarray(seeds, dtype=np.uint64)
    pool = n_bank - (1 if exclude is not None else 0)
    if n_draws > pool:
        raise ValueError(f"a bank of {n_bank} images cannot give {n_draws} distinct perturbations per input"
                         + (" (excluding the input itself)" if exclude is not None else ""))
    if n_draws * n_draws <= pool:  # sparse: redraw a row with a repeat from its next candidates
        idx = _candidates(seeds, 0, n_draws, pool)
        attempt = 1
        while True:
            s = np.sort(idx, axis=1)
            rep = (np.diff(s, axis=1) == 0).any(axis=1)
            if not rep.any():
                break
            idx[rep] = _candidates(seeds[rep], attempt * n_draws, n_draws, pool)
            attempt += 1
    else:  # dense: the n_draws smallest of one keyed value per bank image
        idx = np.argsort(_candidates(seeds, 0, pool, 2**62), axis=1, kind="stable")[:, :n_draws]
    if exclude is not None:
        idx = idx + (idx >= np.asarray(exclude)[:, None])
    return idx
