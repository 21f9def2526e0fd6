"""The run-time check beyond STRIP (student disagreement + hidden features by default, one calibrated min-p test).

`RuntimeCheck` is the detector; `load_check` restores whichever run-time artifact a directory
holds (this check's `check.json`, or STRIP's `boundary.json`) and `check_artifact_sha256` hashes
it, so the gate, the signed release and the guarded model handle both kinds alike.
"""
from __future__ import annotations

from pathlib import Path

from .check import DEFAULT_STAGES, DEFAULT_STATISTICS
from .detector import ACTIVATION_FILE, BANK_FILE, CHECK_FILE, REFERENCE_FILE, RuntimeCheck

KINDS = ("runtime", "strip")
DEFAULT_KIND = "runtime"  # the check the gate attaches and the evaluator calibrates unless told otherwise

__all__ = ["CHECK_FILE", "DEFAULT_KIND", "KINDS", "RuntimeCheck", "calibrate_check", "check_artifact_sha256", "check_kind", "describe",
           "load_check"]


def check_kind(directory) -> str:
    """'runtime' for a RuntimeCheck artifact, 'strip' for a STRIP boundary; refuses anything else."""
    from ..errors import ArtifactIntegrityError
    from ..strip.artifact import BOUNDARY_FILE

    directory = Path(directory)
    has_check, has_boundary = (directory / CHECK_FILE).is_file(), (directory / BOUNDARY_FILE).is_file()
    if has_check == has_boundary:
        raise ArtifactIntegrityError(f"{directory} must hold exactly one of {CHECK_FILE} (run-time check) or "
                                     f"{BOUNDARY_FILE} (STRIP boundary)")
    return "runtime" if has_check else "strip"


def check_artifact_sha256(directory) -> str:
    """One hash for the whole artifact: sha256 over each file's name and sha256 (STRIP's rule, every file)."""
    from ..errors import ArtifactIntegrityError
    from ..artifact_files import files_sha256
    from ..strip.artifact import artifact_sha256

    directory = Path(directory)
    if check_kind(directory) == "strip":
        return artifact_sha256(directory)
    names = sorted(p.name for p in directory.iterdir())
    allowed = {CHECK_FILE, BANK_FILE, REFERENCE_FILE, ACTIVATION_FILE}
    if set(names) - allowed or not {CHECK_FILE, BANK_FILE} <= set(names):
        raise ArtifactIntegrityError(f"run-time check artifact {directory} holds {names}; expected "
                                     f"{sorted(allowed)} (reference.onnx and activation.npz only with their statistics)")
    return files_sha256(directory, names, label="run-time check artifact")


def load_check(directory, oracle, expected_sha256: str | None = None):
    """The fitted detector saved in `directory` for `oracle` (RuntimeCheck or Strip), hash-verified."""
    from ..errors import ArtifactIntegrityError
    from ..strip.detector import Strip

    if check_kind(directory) == "strip":
        return Strip.load(directory, oracle, expected_sha256=expected_sha256, progress=False)
    if expected_sha256 is not None and check_artifact_sha256(directory) != expected_sha256:
        raise ArtifactIntegrityError("run-time check artifact refused: its files do not hash to the signed digest")
    return RuntimeCheck.load(directory, oracle)


def calibrate_check(oracle, heldout, kind: str = DEFAULT_KIND, frr: float = 0.01, n_perturbations: int = 10,
                    blend: str | None = None, statistics=DEFAULT_STATISTICS, stages=DEFAULT_STAGES, seed: int = 0,
                    min_per_class: int = 5):
    """Held-out expectations first (raises DataValidationError), then the chosen check's fit + infer_threshold."""
    from ..strip import DEFAULT_BLEND, calibrate_strip
    from ..validation import validate_heldout

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    if kind == "strip":
        return calibrate_strip(oracle, heldout, frr=frr, n_perturbations=n_perturbations, blend=blend, seed=seed,
                               min_per_class=min_per_class)
    validate_heldout(heldout.x, heldout.y, oracle.input_shape, oracle.n_classes, min_per_class=min_per_class)
    statistics, without = usable_statistics(oracle, statistics)
    det = RuntimeCheck(oracle, n_perturbations=n_perturbations, blend=blend or DEFAULT_BLEND, statistics=statistics,
                       stages=stages, seed=seed, progress=False)
    if without:
        det.extra["activation"] = without
    return det.fit(heldout.x, heldout.y).infer_threshold(frr)


def usable_statistics(oracle, statistics) -> tuple[tuple, str | None]:
    """(statistics, None), or without "activation" and the reason where the model has no last dense layer whose
    input can be read (`activations.hidden_output_graph`): the check then runs on the rest (with STRIP's entropy
    where no copy statistic is left) and says so."""
    from ..errors import ModelLoadError
    from .activations import hidden_output_graph

    statistics = tuple(statistics)
    if "activation" not in statistics:
        return statistics, None
    try:
        hidden_output_graph(oracle.model_bytes)
    except ModelLoadError as e:
        rest = tuple(s for s in statistics if s != "activation")
        if not rest:
            raise
        if not {"entropy", "dispersion"} & set(rest):  # STRIP's entropy takes its place (the check's first design)
            rest = ("entropy",) + rest
        return rest, f"not used: {e}; {', '.join(rest)} decide instead"
    return statistics, None


def describe(det) -> dict:
    """The settings and threshold of a fitted check (either kind), as the gate logs, tags and reports them."""
    return det.describe()
