"""DeepInspect, black-box: model inversion -> conditional trigger generator -> double-MAD test.

`scan(model)` touches the model only through `ModelOracle` (probabilities for inputs) and
records every query per phase:

1. ``inversion``  recover a substitute set of every class from queries (Eq. 1);
2. ``generator``  train G(z, t) for all classes against the oracle as fixed discriminator (Eq. 6);
3. ``statistics`` per class, the L1 of the smallest rescaled, support-pruned trigger
   s * M * G(z, t) that moves at least `success_target` (0.99) of the other classes'
   substitute images to t, on the oracle (see `statistic`);
4. the left-tail double-MAD test flags classes whose statistic is abnormally small (Eq. 7).
   With labelled held-out data the statistic is first normalised by benign reference models
   trained on it and measured by steps 1-3 themselves (`reference_models`, see `reference`):
   the test then sees log stat[t] - mean_j log ref_j[t], which cancels the natural ease of a
   class that every model shares. Without held-out data the paper's plain statistic is tested.
   The test runs on log(statistic) by default (`test_scale="log"`): perturbation sizes are
   positive and spread multiplicatively across classes (on Fashion-MNIST the easiest benign
   classes need about half the median trigger), and the MAD assumes a roughly symmetric
   bulk, which the logarithm restores. `test_scale="linear"` tests the raw levels.
   With reference models every class's measured trigger is also stamped on the substitute
   images and tried on the references (`transfer`): `transfer_rates` is always reported, and
   with `transfer_factor` > 0 a flagged class whose trigger moves the references too (a
   natural class feature, not a backdoor) is reported as transferable instead of flagged.
5. ``co-targets`` the flagged set is closed under co-activation links: a class to and from
   which a flagged class's recovered trigger carries probability on the oracle is the same
   multi-target trojan's co-target. With reference models a link must also be `link_reference_factor`
   times its natural level on them, and three classes linked pairwise are a finding of their
   own (see `cotargets`); without references links never flag a clean model.

With a query budget, inversion may spend at most `inversion_share` of it, the statistics'
exact cost is reserved up front, and the generator stops early when its share runs out (the
steps actually run are in the result's config). Everything stochastic derives from `seed`,
so a scan on CPU is repeatable.
"""
from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass, replace

import numpy as np

from .cotargets import (DEFAULT_LINK_THRESHOLD, DEFAULT_REFERENCE_FACTOR, anomalous_links, co_activation,
                        co_activation_cost, co_targets, link_strength, triangle_members)
from .anomaly import alpha_from_cutoff, cutoff_from_alpha, double_mad_test, DEFAULT_CUTOFF
from .data import Dataset
from .generator import GeneratorTrainer, default_device
from .inversion import ModelInversion
from .errors import DataValidationError
from .oracle import ModelOracle
from .reference import normalised_levels, split_heldout, train_reference
from .scan_result import VERDICT_CLEAN, VERDICT_TROJANED, ScanResult
from .statistic import DEFAULT_LADDER, SUCCESS_RULES, statistics_cost, support_ladder, trigger_statistics
from .transfer import specific_classes, transfer_rates

GRADIENTS = ("nes", "surrogate")
TEST_SCALES = ("log", "linear")
HELDOUT_MODES = ("seed", "replace", "invert")


@dataclass
class ScanConfig:
    """Every knob of a scan; `None` tiles are chosen from the input size (1 up to 16 px, else 2)."""

    # model inversion (Eq. 1)
    n_per_class: int = 20
    inversion_steps: int = 150
    inversion_lr: float = 0.05
    tv_weight: float = 0.01
    target_confidence: float = 0.99
    inversion_pairs: int = 10
    inversion_sigma: float = 0.1
    inversion_tile: int | None = None
    init_range: tuple = (0.0, 0.2)
    heldout_mode: str = "replace"  # replace | seed | invert, used only when held-out data is given
    # reference normalisation (see `reference`; needs labelled held-out data)
    reference_models: int = 3
    reference_epochs: int = 40
    reference_min_per_class: int = 10
    # keep a flagged class only if its trigger moves the references at most this many times as
    # often as the median class's trigger does (see `transfer`); 0 reports the rates, filters nothing
    transfer_factor: float = 0.0
    # generator (Eq. 3-6)
    gradient: str = "nes"  # nes | surrogate
    estimator: str = "nes"  # nes | spsa
    generator_steps: int = 300
    batch_per_class: int = 8
    generator_lr: float = 0.02
    gamma1: float = 1.0
    gamma2: float = 0.1
    thresh_fraction: float = 0.01
    success_target: float = 0.99
    success_rule: str = "argmax"  # argmax | outrank (see statistic.stamped_success)
    adapt_every: int = 10
    adapt_factor: float = 1.3
    n_pairs: int = 10
    sigma: float = 0.05
    tile: int | None = None
    z_dim: int = 16
    hidden: int = 128
    variation: float = 0.1
    # statistic
    max_scale: float = 4.0
    bisection_steps: int = 10
    support_ladder: tuple = DEFAULT_LADDER
    test_scale: str = "log"  # log | linear
    min_mad: float = 0.15  # floor of the MAD on the log scale (a trigger ~15% smaller per unit); 0 on linear
    trigger_samples: int = 8
    # co-targets of a multi-target trojan (see `cotargets`); 0 turns the step off
    link_threshold: float = DEFAULT_LINK_THRESHOLD
    link_reference_factor: float = DEFAULT_REFERENCE_FACTOR
    # budget split
    inversion_share: float = 0.3
    device: str | None = None  # torch device for G and the reference models ("cuda" when present)

    def resolved(self, input_shape) -> "ScanConfig":
        h = int(input_shape[-2])
        auto = 1 if h <= 16 else 2
        return replace(self, inversion_tile=self.inversion_tile or auto, tile=self.tile or auto,
                       device=self.device or default_device())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["init_range"] = list(self.init_range)
        d["support_ladder"] = list(self.support_ladder)
        return d


def versions() -> dict:
    import onnxruntime
    import torch

    from . import __version__

    return {"trojan_gate": __version__, "python": platform.python_version(), "numpy": np.__version__,
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__}


def _as_oracle(model) -> ModelOracle:
    return model if isinstance(model, ModelOracle) else ModelOracle(model)


def _as_dataset(heldout) -> Dataset | None:
    if heldout is None or isinstance(heldout, Dataset):
        return heldout
    x, y = heldout
    return Dataset(np.asarray(x, np.float32), np.asarray(y))


def scan(model, heldout=None, seed: int = 0, budget: int | None = None, cutoff: float | None = None,
         alpha: float | None = None, config: ScanConfig | None = None, progress: bool = True,
         **overrides) -> ScanResult:
    """Scan an ONNX classifier (path, bytes or ModelOracle) for trojans, black-box.

    heldout : optional clean data (Dataset or (x, y)); seeds or replaces inversion
    seed : seed of everything stochastic
    budget : optional cap on this scan's oracle queries
    cutoff / alpha : detection threshold on the deviation factor (default c = 2), or the
        significance it is derived from (c = Phi^-1(1 - alpha / 2))
    config / overrides : a ScanConfig, and field overrides on top of it
    """
    if cutoff is not None and alpha is not None:
        raise ValueError("give cutoff or alpha, not both")
    cutoff = cutoff_from_alpha(alpha) if alpha is not None else float(DEFAULT_CUTOFF if cutoff is None else cutoff)
    oracle = _as_oracle(model)
    cfg = replace(config or ScanConfig(), **overrides).resolved(oracle.input_shape)
    if cfg.gradient not in GRADIENTS:
        raise ValueError(f"gradient must be one of {GRADIENTS}, not {cfg.gradient!r}")
    if cfg.success_rule not in SUCCESS_RULES:
        raise ValueError(f"success_rule must be one of {SUCCESS_RULES}, not {cfg.success_rule!r}")
    if cfg.test_scale not in TEST_SCALES:
        raise ValueError(f"test_scale must be one of {TEST_SCALES}, not {cfg.test_scale!r}")
    if not cfg.transfer_factor >= 0:
        raise ValueError(f"transfer_factor must be >= 0 (0: report only), not {cfg.transfer_factor!r}")
    if cfg.heldout_mode not in HELDOUT_MODES:
        raise ValueError(f"heldout_mode must be one of {HELDOUT_MODES}, not {cfg.heldout_mode!r}")
    heldout = _as_dataset(heldout)
    previous_budget = oracle.budget
    if budget is not None:
        oracle.budget = oracle.queries + int(budget)
    try:
        return _scan(oracle, heldout, seed, budget, cutoff, cfg, progress)
    finally:
        oracle.budget = previous_budget


def _measure(oracle: ModelOracle, substitute, seed: int, budget, cfg: ScanConfig, progress: bool, wall: dict):
    """Phases 1-3 against one model: substitute set, generator, per-class statistic."""
    k = oracle.n_classes
    n_sources = (k - 1) * cfg.n_per_class
    n_supports = len(support_ladder(int(np.prod(oracle.input_shape)), cfg.support_ladder))
    stats_reserve = statistics_cost(k, n_sources, cfg.bisection_steps, n_supports) + k * cfg.n_per_class
    if cfg.link_threshold > 0:
        stats_reserve += co_activation_cost(k, n_sources)

    # 1. model inversion
    t0 = time.perf_counter()
    with oracle.phase("inversion"):
        inv_reserve = 0 if budget is None else max(stats_reserve, int(round(budget * (1 - cfg.inversion_share))))
        mode = cfg.heldout_mode if substitute is not None else "invert"
        inv = ModelInversion(n_per_class=cfg.n_per_class, steps=cfg.inversion_steps, lr=cfg.inversion_lr,
                             tv_weight=cfg.tv_weight, target_confidence=cfg.target_confidence,
                             estimator=cfg.estimator, n_pairs=cfg.inversion_pairs, sigma=cfg.inversion_sigma,
                             tile=cfg.inversion_tile, init_range=cfg.init_range, mode=mode, seed=seed,
                             progress=progress).fit(oracle, substitute, reserve=inv_reserve)
    wall["inversion"] = time.perf_counter() - t0

    # 2. conditional generator
    t0 = time.perf_counter()
    with oracle.phase("generator"):
        trainer = _trainer(cfg, seed + 1, progress).fit(oracle, inv.x_, inv.y_, reserve=stats_reserve)
    wall["generator"] = time.perf_counter() - t0

    # 3. per-class statistic, re-measured on the oracle
    t0 = time.perf_counter()
    with oracle.phase("statistics"):
        st = trigger_statistics(oracle, trainer.generator_, inv.x_, inv.y_, success_target=cfg.success_target,
                                max_scale=cfg.max_scale, bisection_steps=cfg.bisection_steps,
                                ladder=cfg.support_ladder, success_rule=cfg.success_rule, seed=seed + 2,
                                progress=progress)
    wall["statistics"] = time.perf_counter() - t0
    return inv, trainer, st, mode


def _measured_generator(trainer, st):
    """The trained generator refined to each class's measured support, at no less than G's own
    scale: the smallest successful scale sits on the decision edge and makes weak patching data.
    From here on a sample is the trigger the statistic measured (scanned and reference models alike)."""
    return trainer.generator_.refine(st.masks, np.maximum(st.scales, 1.0))


def _references(oracle: ModelOracle, heldout, seed: int, cfg: ScanConfig, progress: bool, wall: dict):
    """Split the held-out set, train the reference models and measure their statistics (see `reference`).

    Returns (substitute set or None, reference record or None); without held-out data, or with
    `reference_models=0`, there is no reference and the whole held-out set is the substitute pool;
    with `heldout_mode="invert"` the substitute set comes from inversion (None).
    """
    keep = cfg.heldout_mode != "invert"
    if heldout is None or cfg.reference_models <= 0:
        return (heldout if keep else None), None
    k = oracle.n_classes
    substitute, train = split_heldout(heldout, cfg.n_per_class, k, seed=seed + 5)
    substitute = substitute if keep else None
    counts = np.bincount(train.y, minlength=k)
    if counts.min() < cfg.reference_min_per_class:
        raise DataValidationError([
            f"the reference models need at least {cfg.reference_min_per_class} held-out images per class "
            f"beyond the {cfg.n_per_class} of the substitute set; classes "
            f"{[int(c) for c in np.flatnonzero(counts < cfg.reference_min_per_class)]} have fewer "
            f"(give more held-out data, or reference_models=0 for the paper's unnormalised test)"])
    t0 = time.perf_counter()
    stats, accs, links, oracles = [], [], [], []
    for j in range(cfg.reference_models):
        onnx_bytes, acc = train_reference(train, k, epochs=cfg.reference_epochs, seed=seed + 100 + j,
                                         device=cfg.device)
        ref = ModelOracle(onnx_bytes)
        inv, trainer, st, _ = _measure(ref, substitute, seed, None, cfg, progress, {})
        stats.append(st.statistics)
        if cfg.link_threshold > 0:  # the natural level of every co-activation link (see `cotargets`)
            links.append(link_strength(co_activation(ref, _measured_generator(trainer, st), inv.x_, inv.y_,
                                                     seed=seed + 4, progress=progress)))
        accs.append(acc)
        oracles.append(ref)
    wall["reference"] = time.perf_counter() - t0
    record = {"statistics": np.asarray(stats), "train_accuracy": accs, "train_images": len(train),
              "links": np.asarray(links) if links else None, "oracles": oracles}
    return substitute, record


def _scan(oracle: ModelOracle, heldout, seed: int, budget, cutoff: float, cfg: ScanConfig,
          progress: bool) -> ScanResult:
    k = oracle.n_classes
    q_start = oracle.queries
    ledger_start = {p: (s.queries, s.seconds, s.calls) for p, s in oracle.ledger.phases.items()}
    t_start = time.perf_counter()
    wall = {}
    substitute, reference = _references(oracle, heldout, seed, cfg, progress, wall)
    inv, trainer, st, mode = _measure(oracle, substitute, seed, budget, cfg, progress, wall)
    generator = _measured_generator(trainer, st)

    # 4. left-tail double-MAD test
    levels = np.log(st.statistics) if reference is None else normalised_levels(st.statistics, reference["statistics"])
    tested = levels if cfg.test_scale == "log" else np.exp(levels)
    test = double_mad_test(tested, cutoff, min_mad=cfg.min_mad if cfg.test_scale == "log" else 0.0)
    flagged, transferable, transfer = list(test.flagged), [], None
    if reference is not None:  # does each class's measured trigger move the benign references too?
        t0 = time.perf_counter()
        transfer = transfer_rates(reference["oracles"], trainer.generator_, st.masks, st.scales, inv.x_, inv.y_,
                                  seed=seed + 2, success_rule=cfg.success_rule, progress=progress)
        flagged, transferable = specific_classes(flagged, transfer, cfg.transfer_factor)
        reference["queries"] = sum(o.queries for o in reference["oracles"])  # their statistics, links and transfer
        wall["reference"] += time.perf_counter() - t0

    # 5. co-targets: close the flagged set under co-activation links, measured on the oracle;
    # with references, a link far above its natural level flags its classes on its own
    reference_links = None if reference is None or reference["links"] is None else reference["links"].mean(0)
    linked, activation = [], None
    if cfg.link_threshold > 0 and (flagged or reference_links is not None):
        t0 = time.perf_counter()
        with oracle.phase("co-targets"):
            activation = co_activation(oracle, generator, inv.x_, inv.y_, seed=seed + 4, progress=progress)
        wall["co-targets"] = time.perf_counter() - t0
        graph = anomalous_links(link_strength(activation), reference_links, cfg.link_threshold,
                                cfg.link_reference_factor)
        on_their_own = [] if reference_links is None else triangle_members(graph)
        start = sorted(set(flagged) | set(on_their_own))
        linked = sorted((set(start) | set(co_targets(start, graph))) - set(flagged))
        flagged = sorted(set(flagged) | set(linked))
    samples = np.stack([generator.sample(t, cfg.trigger_samples, seed=seed + 3 + t) for t in range(k)])
    phases = {}
    for name, s in oracle.ledger.phases.items():
        q0, s0, c0 = ledger_start.get(name, (0, 0.0, 0))
        if s.queries - q0 or name in wall:
            phases[name] = {"queries": s.queries - q0, "calls": s.calls - c0,
                            "oracle_seconds": round(s.seconds - s0, 4),
                            "seconds": round(wall.get(name, s.seconds - s0), 4)}
    if reference is not None:
        phases["reference"] = {"queries": 0, "calls": 0, "oracle_seconds": 0.0,
                               "reference_queries": reference["queries"], "seconds": round(wall["reference"], 4)}
    config = cfg.to_dict()
    config.update({"cutoff": cutoff, "alpha": alpha_from_cutoff(cutoff), "budget": budget,
                   "heldout": None if heldout is None else {"n": len(heldout), "mode": mode},
                   "reference": None if reference is None else {
                       "models": cfg.reference_models, "train_images": reference["train_images"],
                       "train_accuracy": [round(a, 4) for a in reference["train_accuracy"]],
                       "queries": reference["queries"]},
                   "inversion_steps_run": inv.steps_run_, "inversion_confidence": float(inv.confidence_.mean()),
                   "generator_steps_run": trainer.steps_run_, "gamma2_final": trainer.gamma2_.tolist(),
                   "thresh": trainer.thresh_, "oracle_device": oracle.device})
    return ScanResult(
        verdict=VERDICT_TROJANED if flagged else VERDICT_CLEAN,
        flagged_classes=flagged,
        co_targets=linked,
        co_activation=None if activation is None else activation.tolist(),
        reference_links=None if reference_links is None else reference_links.tolist(),
        statistics=st.statistics.tolist(),
        deviation_factors=test.deviation_factors.tolist(),
        success_rates=st.success_at_1.tolist(),
        cutoff=cutoff,
        alpha=alpha_from_cutoff(cutoff),
        n_classes=k,
        input_shape=tuple(oracle.input_shape),
        model_sha256=oracle.sha256,
        queries=oracle.queries - q_start,
        seconds=time.perf_counter() - t_start,
        phases=phases,
        seed=seed,
        config=config,
        versions=versions(),
        trigger_samples=samples,
        inverted_x=inv.x_,
        inverted_y=inv.y_,
        generator=generator,
        trigger_scales=st.scales.tolist(),
        reached=st.reached.tolist(),
        trigger_supports=st.supports.tolist(),
        dense_statistics=st.dense.tolist(),
        trigger_masks=st.masks,
        test_scale=cfg.test_scale,
        median=test.median,
        mad=test.mad,
        reference_statistics=None if reference is None else reference["statistics"].tolist(),
        transfer_rates=None if transfer is None else transfer.tolist(),
        transferable_classes=transferable,
    )


def _trainer(cfg: ScanConfig, seed: int, progress: bool):
    common = dict(steps=cfg.generator_steps, batch_per_class=cfg.batch_per_class, lr=cfg.generator_lr,
                  gamma1=cfg.gamma1, gamma2=cfg.gamma2, thresh_fraction=cfg.thresh_fraction,
                  success_target=cfg.success_target, success_rule=cfg.success_rule,
                  adapt_every=cfg.adapt_every, adapt_factor=cfg.adapt_factor,
                  z_dim=cfg.z_dim, hidden=cfg.hidden, variation=cfg.variation, device=cfg.device, seed=seed,
                  progress=progress)
    if cfg.gradient == "surrogate":
        from .surrogate import SurrogateGeneratorTrainer

        return SurrogateGeneratorTrainer(**common)
    return GeneratorTrainer(estimator=cfg.estimator, n_pairs=cfg.n_pairs, sigma=cfg.sigma, tile=cfg.tile, **common)
