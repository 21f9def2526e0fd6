"""Keyed superimposed copies: the perturbations both run-time detectors send to the model.

An input x meets N images of a held-out bank B, drawn from its own bytes (see `draws`), each
superimposed on it with one of `BLEND_RULES`:

    copy_j(x) = blend(x, B[idx_j(x)]),   idx(x) = keyed_indices(blake2b(bytes(x), key), |B|, N)
    key       = detector_key(seed, sha256 of the served model)

Superimposition rules:
- "average": 0.5 x + 0.5 b (the open-source libraries' convention);
- "sum": clip(x + b, 0, 1) (the STRIP paper's public code adds at full weight);
- "max": pixel-wise maximum(x, b) (the default: the lowest FAR at preset FRR 1% in
  `trojan-gate benchmark strip`, benchmarks/strip.md).

`ask_shuffled` sends rows to a model in a fresh random order every call, so a model whose answer
depends on a row's position or neighbours cannot tell an input from its copies.
"""
from __future__ import annotations

import numpy as np

from .draws import detector_key, input_seeds, keyed_indices

DEFAULT_BLEND = "max"


def _average(x, b, out):
    np.add(x, b, out=out)
    out *= 0.5
    return out


def _sum(x, b, out):
    np.add(x, b, out=out)
    np.clip(out, 0.0, 1.0, out=out)
    return out


def _max(x, b, out):
    return np.maximum(x, b, out=out)


BLEND_RULES = {"average": _average, "sum": _sum, "max": _max}


def superimpose(x: np.ndarray, b: np.ndarray, rule: str = DEFAULT_BLEND, out: np.ndarray | None = None) -> np.ndarray:
    """Superimpose bank images `b` on inputs `x` (broadcasting) with one of BLEND_RULES."""
    if rule not in BLEND_RULES:
        raise ValueError(f"unknown blend rule {rule!r}; choose from {tuple(BLEND_RULES)}")
    if out is None:
        out = np.empty(np.broadcast_shapes(x.shape, b.shape), dtype=np.float32)
    return BLEND_RULES[rule](x, b, out)


def ask_shuffled(oracle, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The oracle's probabilities for the rows of x, asked in one call in the random order `rng` draws."""
    order = rng.permutation(len(x))
    out = np.empty((len(x), oracle.n_classes), dtype=np.float64)
    out[order] = oracle.predict_proba(x[order])
    return out


class KeyedCopies:
    """The bank and the keyed draws of one detector (see the module's equations).

    Parameters
    ----------
    bank : ndarray (m, C, H, W)
        Held-out images the copies are superimposed on.
    n_perturbations : int
        N, the most copies an input gets.
    blend : str
        A key of `BLEND_RULES`.
    seed : int
        With `model_sha256`, keys the draws.
    model_sha256 : str
        The served model's hash: the same input meets other bank images on another model.
    in_graph : bool
        Build the copies inside ONNX Runtime where the model allows it (`copies_graph`); False builds
        them in numpy always. Both give the same rows.
    """

    def __init__(self, bank: np.ndarray, n_perturbations: int, blend: str, seed: int, model_sha256: str,
                 in_graph: bool = True):
        if blend not in BLEND_RULES:
            raise ValueError(f"unknown blend rule {blend!r}; choose from {tuple(BLEND_RULES)}")
        self.bank = np.ascontiguousarray(bank, dtype=np.float32)
        self.n_perturbations = int(n_perturbations)
        self.blend = blend
        self.key = detector_key(int(seed), model_sha256)
        self.in_graph = bool(in_graph)
        self._graphs = {}  # id(oracle) -> (oracle, GraphCopies)

    def draw_indices(self, x: np.ndarray, exclude=None) -> np.ndarray:
        """(n, N) bank indices of each input's copies, drawn from its own bytes (never bank[exclude[i]])."""
        return keyed_indices(input_seeds(x, self.key), len(self.bank), self.n_perturbations, exclude)

    def copies_at(self, x: np.ndarray, idx: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """(n * k, C, H, W) copies of x (n inputs) on bank[idx] (n, k), input i's in rows i*k .. i*k + k - 1,
        gathered straight into `out` (float32 of that shape, when given) and superimposed in place."""
        n, k = idx.shape
        shape = (n * k,) + self.bank.shape[1:]
        if out is None:
            out = np.empty(shape, dtype=np.float32)
        elif out.shape != shape or out.dtype != np.float32:
            raise ValueError(f"out must be float32 of shape {shape}, got {out.dtype} {out.shape}")
        np.take(self.bank, idx.ravel(), axis=0, out=out)
        view = out.reshape((n, k) + self.bank.shape[1:])
        BLEND_RULES[self.blend](view, x[:, None], view)
        return out

    def perturb(self, x: np.ndarray, exclude=None, out: np.ndarray | None = None) -> np.ndarray:
        """All N copies of every input (`copies_at` with the full draws)."""
        return self.copies_at(x, self.draw_indices(x, exclude), out=out)

    def graph_for(self, oracle):
        """The wrapper-graph asker for `oracle` (built once per oracle; its `session` is None where the copies
        must be built in numpy)."""
        from .copies_graph import GraphCopies

        entry = self._graphs.get(id(oracle))
        if entry is None or entry[0] is not oracle:
            entry = self._graphs[id(oracle)] = (oracle, GraphCopies(oracle, self))
        return entry[1]

    def ask(self, oracle, x: np.ndarray, idx: np.ndarray, rng: np.random.Generator, with_self: bool = True):
        """(p_self (n, K) or None, p_copies (n, k, K)): the oracle's answers on checked inputs x and their copies
        on bank[idx], rows in a fresh random order; inside ONNX Runtime (`copies_graph`) where it serves,
        else built here and sent in one call."""
        n, k = idx.shape
        if self.in_graph and n and self.graph_for(oracle).session is not None:
            return self.graph_for(oracle).ask(x, idx, rng, with_self)
        copies = self.copies_at(x, idx)
        out = ask_shuffled(oracle, np.concatenate([x, copies]) if with_self else copies, rng)
        if not with_self:
            return None, out.reshape(n, k, -1)
        return out[:n], out[n:].reshape(n, k, -1)
