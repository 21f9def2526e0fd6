"""Errors with names that say what went wrong; the gate maps every one to verdict `error`."""


class TrojanGateError(Exception):
    """Base class of every error this project raises on purpose."""


class ModelLoadError(TrojanGateError):
    """The ONNX file is missing, malformed, or not an image classifier we can query."""


class ModelOutputError(TrojanGateError):
    """The model answered with something that is not a finite class-score matrix."""


class InputShapeError(TrojanGateError):
    """Inputs do not match the model's (C, H, W) input."""


class InputRangeError(InputShapeError):
    """Inputs hold values outside the model's declared range (default [0, 1])."""


class DeadlineExceeded(TrojanGateError):
    """Work ran past its deadline (`--timeout`) and was stopped."""


class OracleTimeout(DeadlineExceeded):
    """A model call ran past its time limit or the deadline and was stopped."""


class ModelMemoryError(TrojanGateError):
    """A model call asked ONNX Runtime for more memory than the execution cap and was stopped."""


class QueryBudgetExceeded(TrojanGateError):
    """The scan asked the oracle for more inputs than its budget allows."""


class DataValidationError(TrojanGateError):
    """A held-out set failed one or more great-expectations checks."""

    def __init__(self, failures):
        self.failures = list(failures)
        lines = "\n".join(f"  - {f}" for f in self.failures)
        super().__init__(f"held-out data failed {len(self.failures)} expectation(s):\n{lines}")


class ArtifactIntegrityError(TrojanGateError):
    """A boundary artifact does not verify (hash mismatch, missing file, wrong model)."""


class CalibrationMismatchError(TrojanGateError):
    """A scan calibration was built for another task (input shape, classes or held-out data)."""


class NotFittedError(TrojanGateError, RuntimeError):
    """A detector was asked to score, threshold or save before `fit`."""


class ThresholdNotInferredError(TrojanGateError, RuntimeError):
    """A detector was asked to decide or save before `infer_threshold`."""
