"""Phases 1-3 of DeepInspect against one model, and the benign reference models that use them.

`measure_model` runs, against any oracle, the three phases whose outcome the anomaly test
reads: model inversion (Eq. 1) or the held-out substitute set, the conditional generator
G(z, t) (Eq. 6), and the per-class trigger statistic (see `statistic`). The scanned model and
the reference models go through exactly these steps, so their statistics compare like with
like. `measure_references` trains the reference models on labelled held-out data (see
`reference`) and measures them; their queries are counted on their own oracles and never
reach the scanned model.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..errors import DataValidationError
from ..oracle import ModelOracle
from .cotargets import co_activation, co_activation_cost, link_strength
from .generator import GeneratorTrainer
from .inversion import ModelInversion
from ..classifier_training import train_reference
from .reference import split_heldout
from .statistic import statistics_cost, support_ladder, trigger_statistics


@dataclass
class Measurement:
    """What phases 1-3 produced for one model."""

    inversion: ModelInversion
    trainer: GeneratorTrainer
    statistics: object  # statistic.TriggerStatistics

    @property
    def generator(self):
        """The trained generator refined to each class's measured support, at no less than G's own
        scale: the smallest successful scale sits on the decision edge and makes weak patching data.
        From here on a sample is the trigger the statistic measured."""
        st = self.statistics
        return self.trainer.generator_.refine(st.masks, np.maximum(st.scales, 1.0))


def measure_model(oracle: ModelOracle, substitute, seed: int, budget, cfg, progress: bool,
                  wall: dict) -> Measurement:
    """Phases 1-3 against one model: substitute set, generator, per-class statistic.

    `substitute` is a labelled Dataset (the clean-data variant: its images are the substitute
    set) or None (model inversion from noise). With a `budget`, inversion leaves what the
    generator and the statistics need; wall-clock seconds per phase go into `wall`.
    """
    k = oracle.n_classes
    n_sources = (k - 1) * cfg.n_per_class
    n_supports = len(support_ladder(int(np.prod(oracle.input_shape)), cfg.support_ladder))
    stats_reserve = statistics_cost(k, n_sources, cfg.bisection_steps, n_supports) + k * cfg.n_per_class
    if cfg.link_threshold > 0:
        stats_reserve += co_activation_cost(k, n_sources)

    t0 = time.perf_counter()
    with oracle.phase("inversion"):
        inv_reserve = 0 if budget is None else max(stats_reserve, int(round(budget * (1 - cfg.inversion_share))))
        inv = ModelInversion(n_per_class=cfg.n_per_class, steps=cfg.inversion_steps, lr=cfg.inversion_lr,
                             tv_weight=cfg.tv_weight, target_confidence=cfg.target_confidence,
                             n_pairs=cfg.inversion_pairs, sigma=cfg.inversion_sigma, tile=cfg.inversion_tile,
                             init_range=cfg.init_range, seed=seed,
                             progress=progress).fit(oracle, substitute, reserve=inv_reserve)
    wall["inversion"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    with oracle.phase("generator"):
        trainer = GeneratorTrainer(
            steps=cfg.generator_steps, batch_per_class=cfg.batch_per_class, lr=cfg.generator_lr,
            gamma1=cfg.gamma1, gamma2=cfg.gamma2, thresh_fraction=cfg.thresh_fraction,
            success_target=cfg.success_target, adapt_every=cfg.adapt_every, adapt_factor=cfg.adapt_factor,
            n_pairs=cfg.n_pairs, sigma=cfg.sigma, tile=cfg.tile, z_dim=cfg.z_dim, hidden=cfg.hidden,
            variation=cfg.variation, device=cfg.device, seed=seed + 1,
            progress=progress).fit(oracle, inv.x_, inv.y_, reserve=stats_reserve)
    wall["generator"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    with oracle.phase("statistics"):
        st = trigger_statistics(oracle, trainer.generator_, inv.x_, inv.y_, success_target=cfg.success_target,
                                max_scale=cfg.max_scale, bisection_steps=cfg.bisection_steps,
                                ladder=cfg.support_ladder, seed=seed + 2, progress=progress)
    wall["statistics"] = time.perf_counter() - t0
    return Measurement(inv, trainer, st)


@dataclass
class References:
    """The benign reference models' measurements: statistics (n_models, K), mean links (K, K)."""

    statistics: np.ndarray
    links: np.ndarray | None
    train_accuracy: list
    train_images: int
    queries: int

    def summary(self, n_models: int) -> dict:
        """JSON-able summary: model count, training images, rounded training accuracies and queries."""
        return {"models": n_models, "train_images": self.train_images,
                "train_accuracy": [round(a, 4) for a in self.train_accuracy], "queries": self.queries}


def measure_references(oracle: ModelOracle, heldout, seed: int, cfg, progress: bool, wall: dict):
    """Split the held-out set, train the reference models and measure their statistics (see `reference`).

    Returns (substitute set, References or None). Without held-out data there is no substitute
    set (inversion); with `reference_models=0` the whole held-out set is the substitute pool.
    """
    if heldout is None or cfg.reference_models <= 0:
        return heldout, None
    k = oracle.n_classes
    substitute, train = split_heldout(heldout, cfg.n_per_class, k, seed=seed + 5)
    counts = np.bincount(train.y, minlength=k)
    if counts.min() < cfg.reference_min_per_class:
        raise DataValidationError([
            f"the reference models need at least {cfg.reference_min_per_class} held-out images per class "
            f"beyond the {cfg.n_per_class} of the substitute set; classes "
            f"{[int(c) for c in np.flatnonzero(counts < cfg.reference_min_per_class)]} have fewer "
            f"(give more held-out data, or reference_models=0 for the paper's unnormalised test)"])
    t0 = time.perf_counter()
    stats, accs, links, queries = [], [], [], 0
    for j in range(cfg.reference_models):
        onnx_bytes, acc = train_reference(train, k, epochs=cfg.reference_epochs, seed=seed + 100 + j,
                                         device=cfg.device)
        ref = ModelOracle(onnx_bytes)
        m = measure_model(ref, substitute, seed, None, cfg, progress, {})
        stats.append(m.statistics.statistics)
        if cfg.link_threshold > 0:  # the natural level of every co-activation link (see `cotargets`)
            links.append(link_strength(co_activation(ref, m.generator, m.inversion.x_, m.inversion.y_,
                                                     seed=seed + 4, progress=progress)))
        accs.append(acc)
        queries += ref.queries
    wall["reference"] = time.perf_counter() - t0
    return substitute, References(np.asarray(stats), np.asarray(links).mean(0) if links else None, accs,
                                  len(train), queries)
