"""Co-targets of a multi-target trojan, measured on the oracle (DeepInspect Sec. 4, "multi-target").

In the paper's multi-target trojan one trigger sends a stamped input to a class drawn at
random from a set T, so the model answers the trigger with probability spread over T. The
per-class statistic sees such a trojan badly: no target wins the argmax on the trigger alone,
and the generator of each target adds that class's natural features, so typically only one
or two targets fall past the cutoff. The paper leaves the multi-target loss open (Sec. 6:
"the loss can be modified to allow multiple target classes given the same manipulated input").

What each target's recovered trigger does keep is a piece of the shared trigger, and so it
hands probability to the *other* targets too. The co-activation matrix records that:

    A[t, u] = mean over substitute images x with class not in {t, u} of  D(x + Delta_t)[u],

with Delta_t the measured trigger of class t (its support and scale, as the statistic found
them). Natural class similarity (shirt and T-shirt) gives small values; a shared trigger gives
large values in both directions. The link strength is the geometric mean of the two directions,

    W[t, u] = sqrt(A[t, u] * A[u, t]),

and the flagged set is closed under links: a class linked to a flagged class with
W >= `link_threshold` is a co-target and is flagged as well.

Without reference models links only ever extend a set the double-MAD test already flagged;
they never turn a clean verdict into a trojaned one, since nothing says how strong a natural
link can be for this model. With the benign reference models of `reference` (labelled
held-out data) the natural level of every link is measured on them by the same steps, and a
link counts only when it is also at least `reference_factor` times the references' mean for
that pair (`anomalous_links`). Three classes linked pairwise by such links are a finding of
their own: all three are flagged even when none passed the double-MAD cutoff (a multi-target
trojan whose targets each stay inside the natural spread of the statistic; the paper's
multi-target trojans have |T| = 3, 5, 7). A single pair is not enough on its own: on a
patched digits model two naturally confused digits (1 and 8) reached a link of 0.036, 4.5x
their reference level, while the Fashion-MNIST three-target trojans' links are thousands of
times their reference level (the reference models link classes an order of magnitude more
weakly than the scanned models do, so the factor guards against natural pairs only partly).

The threshold (0.035 by default) was chosen on the Fashion-MNIST lab (6-epoch models, 20
substitute images per class): over 3 benign models and 4 single-target trojans the largest
link between any two classes was 0.022 (T-shirt and shirt on the 6-conv benign model); in
three-target patch trojans the links inside T were 0.054 to 0.081 (the geometric midpoint of
0.022 and 0.054 is 0.035). With 5 targets the probability splits further and the links fall
to 0.018-0.036, inside the natural range: only part of such a T is recovered.
Cost: one oracle pass per class over the substitute images of the other classes.
"""
from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

from .statistic import draw_seed

DEFAULT_LINK_THRESHOLD = 0.035
DEFAULT_REFERENCE_FACTOR = 10.0


def co_activation(oracle, generator, x: np.ndarray, y: np.ndarray, seed: int = 0,
                  progress: bool = True) -> np.ndarray:
    """A[t, u] (K x K, diagonal 0): mean probability of u on other classes' images stamped with t's trigger."""
    k = generator.n_classes
    x = np.asarray(x, np.float32)
    y = np.asarray(y)
    a = np.zeros((k, k))
    for t in tqdm(range(k), desc="co-targets", disable=not progress, leave=False):
        src, ysrc = x[y != t], y[y != t]
        if not len(src):
            continue
        delta = generator.sample(t, len(src), seed=draw_seed(seed, t))
        proba = np.asarray(oracle.predict_proba(np.clip(src + delta, 0.0, 1.0)), dtype=np.float64)
        for u in range(k):
            keep = ysrc != u
            if u != t and keep.any():
                a[t, u] = float(proba[keep, u].mean())
    return a


def link_strength(a: np.ndarray) -> np.ndarray:
    """W[t, u] = sqrt(A[t, u] A[u, t]): symmetric, both directions must carry probability."""
    a = np.clip(np.asarray(a, dtype=np.float64), 0.0, None)
    w = np.sqrt(a * a.T)
    np.fill_diagonal(w, 0.0)
    return w


def anomalous_links(links: np.ndarray, reference_links=None, threshold: float = DEFAULT_LINK_THRESHOLD,
                    reference_factor: float = DEFAULT_REFERENCE_FACTOR) -> np.ndarray:
    """Boolean (K, K): W >= threshold and, given the references' W ((n_models, K, K), or their mean
    (K, K)), W >= factor * their mean."""
    links = np.asarray(links, dtype=np.float64)
    ok = links >= threshold
    if reference_links is not None:
        natural = np.asarray(reference_links, dtype=np.float64).reshape((-1,) + links.shape).mean(0)
        ok &= links >= reference_factor * natural
    np.fill_diagonal(ok, False)
    return ok


def co_targets(flagged, links: np.ndarray, threshold: float = DEFAULT_LINK_THRESHOLD) -> list[int]:
    """Classes not in `flagged` that a chain of links joins to a flagged class, sorted.

    `links` is W (a link is W >= threshold) or a boolean graph from `anomalous_links`."""
    links = np.asarray(links)
    graph = links if links.dtype == bool else links >= threshold
    found = set(int(c) for c in flagged)
    frontier = list(found)
    while frontier:
        t = frontier.pop()
        for u in np.flatnonzero(graph[t]):
            if int(u) not in found:
                found.add(int(u))
                frontier.append(int(u))
    return sorted(found - set(int(c) for c in flagged))


def triangle_members(graph: np.ndarray) -> list[int]:
    """Classes that are one corner of a triangle of links (three classes linked pairwise), sorted."""
    g = np.asarray(graph, dtype=bool)
    g = (g & g.T).astype(np.int64)
    np.fill_diagonal(g, 0)
    return [int(c) for c in np.flatnonzero(np.diagonal(g @ g @ g) > 0)]


def co_activation_cost(n_classes: int, n_sources: int) -> int:
    """Queries of `co_activation`: one pass per class over the other classes' images."""
    return int(n_classes * n_sources)
