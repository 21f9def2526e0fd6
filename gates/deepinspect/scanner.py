"""DeepInspect, black-box: model inversion -> conditional trigger generator -> double-MAD test.

`DeepInspect(...).scan(model)` touches the model only through `ModelOracle` (probabilities for
inputs) and records every query per phase:

1. ``inversion``  recover a substitute set of every class from queries (Eq. 1), or take it
   from labelled held-out data (the paper's clean-data variant);
2. ``generator``  train G(z, t) for all classes against the oracle as fixed discriminator (Eq. 6);
3. ``statistics`` per class, the L1 of the smallest rescaled, support-pruned trigger
   s * M * G(z, t) that moves at least `success_target` (0.99) of the other classes'
   substitute images to t, on the oracle (see `statistic`);
4. the left-tail double-MAD test (Eq. 7) on log statistics flags classes whose trigger is
   abnormally small. Trigger sizes are positive and spread multiplicatively between classes,
   and the MAD assumes a roughly symmetric bulk, which the logarithm restores. With labelled
   held-out data the statistic is first normalised by benign reference models trained on it
   and measured by steps 1-3 themselves (see `reference`): the test then reads
   log stat[t] - mean_j log ref_j[t], which cancels the natural ease of a class every model shares;
5. ``co-targets`` the flagged set is closed under co-activation links: a class to and from
   which a flagged class's recovered trigger carries probability on the oracle is the same
   multi-target trojan's co-target (see `cotargets`).

With a query budget, inversion may spend at most `inversion_share` of it, the statistics'
exact cost is reserved up front, and the generator stops early when its share runs out.
Everything stochastic derives from `seed`, so a scan on CPU is repeatable.
"""
from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass, fields, replace

import numpy as np

from ..data import Dataset
from ..faults import checkpoint
from ..oracle import ModelOracle
from .anomaly import DEFAULT_CUTOFF, alpha_from_cutoff, cutoff_from_alpha, double_mad_test
from .cotargets import (DEFAULT_LINK_THRESHOLD, DEFAULT_REFERENCE_FACTOR, anomalous_links, co_activation,
                        co_targets, link_strength, triangle_members)
from .generator import default_device
from .measure import measure_model, measure_references
from .reference import normalised_levels
from .result import ScanResult
from .defaults import GAMMA2, GENERATOR_STEPS, SUCCESS_TARGET
from .statistic import DEFAULT_LADDER


@dataclass
class ScanConfig:
    """Every knob of a scan; `None` tiles are chosen from the input size (1 up to 16 px, else 2)."""

    # model inversion (Eq. 1), used when no held-out data is given
    n_per_class: int = 20
    inversion_steps: int = 150
    inversion_lr: float = 0.05
    tv_weight: float = 0.01
    target_confidence: float = 0.99
    inversion_pairs: int = 10
    inversion_sigma: float = 0.1
    inversion_tile: int | None = None
    init_range: tuple = (0.0, 0.2)
    # reference normalisation (see `reference`; needs labelled held-out data)
    reference_models: int = 3
    reference_epochs: int = 40
    reference_min_per_class: int = 10
    # generator (Eq. 3-6)
    generator_steps: int = GENERATOR_STEPS
    batch_per_class: int = 8
    generator_lr: float = 0.02
    gamma1: float = 1.0
    gamma2: float = GAMMA2
    thresh_fraction: float = 0.01
    success_target: float = SUCCESS_TARGET
    adapt_every: int = 10
    adapt_factor: float = 1.3
    n_pairs: int = 10
    sigma: float = 0.05
    tile: int | None = None
    z_dim: int = 16
    hidden: int = 128
    variation: float = 0.1
    # statistic and test
    max_scale: float = 4.0
    bisection_steps: int = 10
    support_ladder: tuple = DEFAULT_LADDER
    min_mad: float = 0.15  # floor of the MAD of log levels (a trigger ~15% smaller per unit)
    trigger_samples: int = 8
    # co-targets of a multi-target trojan (see `cotargets`); 0 turns the step off
    link_threshold: float = DEFAULT_LINK_THRESHOLD
    link_reference_factor: float = DEFAULT_REFERENCE_FACTOR
    # budget split
    inversion_share: float = 0.3
    device: str | None = None  # torch device for G and the reference models ("cuda" when present)

    @classmethod
    def field_names(cls) -> set:
        """The names of all config fields."""
        return {f.name for f in fields(cls)}

    def resolved(self, input_shape) -> "ScanConfig":
        """A copy with `None` tiles chosen from the input height (1 up to 16 px, else 2) and the device filled in."""
        h = int(input_shape[-2])
        auto = 1 if h <= 16 else 2
        return replace(self, inversion_tile=self.inversion_tile or auto, tile=self.tile or auto,
                       device=self.device or default_device())

    def to_dict(self) -> dict:
        """The fields as a JSON-able dict (tuples as lists)."""
        d = asdict(self)
        d["init_range"] = list(self.init_range)
        d["support_ladder"] = list(self.support_ladder)
        return d


def versions() -> dict:
    """Versions of trojan-gate, Python, numpy, torch and onnxruntime, by name."""
    import onnxruntime
    import torch

    from .. import __version__

    return {"trojan_gate": __version__, "python": platform.python_version(), "numpy": np.__version__,
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__}


def as_dataset(heldout) -> Dataset | None:
    """None, a Dataset, or an (x, y) pair as a Dataset."""
    if heldout is None or isinstance(heldout, Dataset):
        return heldout
    x, y = heldout
    return Dataset(np.asarray(x, np.float32), np.asarray(y))


class DeepInspect:
    """Black-box DeepInspect trojan scanner (Chen et al., IJCAI'19).

    Parameters
    ----------
    cutoff : float, optional
        Threshold c on the left-tail deviation factor (Eq. 7); default 2.
    alpha : float, optional
        Significance level instead of a cutoff: c = Phi^-1(1 - alpha / 2) (alpha 0.0455 <-> c 2).
    seed : int
        Seed of everything stochastic (substitute draws, generator, bisection draws, references).
    budget : int, optional
        Cap on the scanned model's oracle queries for one scan.
    config : ScanConfig, optional
        Every other knob; `**options` override its fields by name.
    progress : bool
        Show progress bars.

    Examples
    --------
    >>> result = DeepInspect(cutoff=2.0, seed=0).scan(ModelOracle("m.onnx"), heldout=(x, y))
    >>> result.is_trojaned, result.flagged_classes, result.instance_score
    """

    def __init__(self, cutoff: float | None = None, alpha: float | None = None, seed: int = 0,
                 budget: int | None = None, config: ScanConfig | None = None, progress: bool = True, **options):
        if cutoff is not None and alpha is not None:
            raise ValueError("give cutoff or alpha, not both")
        unknown = sorted(set(options) - ScanConfig.field_names())
        if unknown:
            raise ValueError(f"unknown scan option(s) {unknown}; choose from {sorted(ScanConfig.field_names())}")
        self.cutoff = cutoff
        self.alpha = alpha
        self.seed = int(seed)
        self.budget = budget
        self.config = replace(config or ScanConfig(), **options)
        self.progress = progress
        self.threshold = cutoff_from_alpha(alpha) if alpha is not None else float(
            DEFAULT_CUTOFF if cutoff is None else cutoff)
        if not self.threshold > 0:
            raise ValueError(f"cutoff must be positive, got {self.threshold}")

    def scan(self, model, heldout=None) -> ScanResult:
        """Scan an ONNX classifier (path, bytes or ModelOracle) for trojans.

        heldout : optional labelled clean data (Dataset or (x, y)): its images become the
            substitute set and train the benign reference models of the normalised test.
        """
        oracle = model if isinstance(model, ModelOracle) else ModelOracle(model)
        cfg = self.config.resolved(oracle.input_shape)
        previous_budget = oracle.budget
        if self.budget is not None:
            oracle.budget = oracle.queries + int(self.budget)
        try:
            return _scan(oracle, as_dataset(heldout), self.seed, self.budget, self.threshold, cfg, self.progress)
        finally:
            oracle.budget = previous_budget

    def predict(self, model, heldout=None) -> dict:
        """Alibi Detect's output: {"data": {"instance_score", "is_trojaned", "threshold"}, "meta"}."""
        return self.scan(model, heldout).to_detector_output()


def _phase_table(oracle: ModelOracle, ledger_start: dict, wall: dict, references) -> dict:
    phases = {}
    for name, s in oracle.ledger.phases.items():
        q0, s0, c0 = ledger_start.get(name, (0, 0.0, 0))
        if s.queries - q0 or name in wall:
            phases[name] = {"queries": s.queries - q0, "calls": s.calls - c0,
                            "oracle_seconds": round(s.seconds - s0, 4),
                            "seconds": round(wall.get(name, s.seconds - s0), 4)}
    if references is not None:
        phases["reference"] = {"queries": 0, "calls": 0, "oracle_seconds": 0.0,
                               "reference_queries": references.queries, "seconds": round(wall["reference"], 4)}
    return phases


def _scan(oracle: ModelOracle, heldout, seed: int, budget, cutoff: float, cfg: ScanConfig,
          progress: bool) -> ScanResult:
    k = oracle.n_classes
    q_start = oracle.queries
    ledger_start = {p: (s.queries, s.seconds, s.calls) for p, s in oracle.ledger.phases.items()}
    t_start = time.perf_counter()
    wall = {}
    substitute, refs = measure_references(oracle, heldout, seed, cfg, progress, wall)
    checkpoint("scan.references")
    m = measure_model(oracle, substitute, seed, budget, cfg, progress, wall)
    checkpoint("scan.measured")
    inv, trainer, st = m.inversion, m.trainer, m.statistics
    generator = m.generator

    # 4. left-tail double-MAD test on log levels, reference-normalised when references exist
    levels = np.log(st.statistics) if refs is None else normalised_levels(st.statistics, refs.statistics)
    test = double_mad_test(levels, cutoff, min_mad=cfg.min_mad)
    flagged = list(test.flagged)

    # 5. co-targets: close the flagged set under co-activation links, measured on the oracle;
    # with references, a link far above its natural level flags its classes on its own
    reference_links = None if refs is None else refs.links
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
    config = cfg.to_dict()
    config.update({"cutoff": cutoff, "alpha": alpha_from_cutoff(cutoff), "budget": budget,
                   "heldout": None if heldout is None else {"n": len(heldout)},
                   "reference": None if refs is None else refs.summary(cfg.reference_models),
                   "inversion_steps_run": inv.steps_run_, "inversion_confidence": float(inv.confidence_.mean()),
                   "generator_steps_run": trainer.steps_run_, "gamma2_final": trainer.gamma2_.tolist(),
                   "thresh": trainer.thresh_, "oracle_device": oracle.device})
    return ScanResult(
        is_trojaned=bool(flagged), flagged_classes=flagged, co_targets=linked,
        co_activation=None if activation is None else activation.tolist(),
        reference_links=None if reference_links is None else reference_links.tolist(),
        statistics=st.statistics.tolist(), deviation_factors=test.deviation_factors.tolist(),
        success_rates=st.success_at_1.tolist(), threshold=cutoff, alpha=alpha_from_cutoff(cutoff),
        n_classes=k, input_shape=tuple(oracle.input_shape), model_sha256=oracle.sha256,
        queries=oracle.queries - q_start, seconds=time.perf_counter() - t_start,
        phases=_phase_table(oracle, ledger_start, wall, refs), seed=seed, config=config, versions=versions(),
        trigger_samples=samples, inverted_x=inv.x_, inverted_y=inv.y_, generator=generator,
        trigger_scales=st.scales.tolist(), reached=st.reached.tolist(), trigger_supports=st.supports.tolist(),
        dense_statistics=st.dense.tolist(), trigger_masks=st.masks, median=test.median, mad=test.mad,
        reference_statistics=None if refs is None else refs.statistics.tolist(),
    )
