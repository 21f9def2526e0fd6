"""Property-based fuzzing (hypothesis) of what untrusted callers hand the gate: inputs, requests,
held-out data, option strings and settings. Each either works or is refused with the project's
named error; nothing else escapes."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from trojan_gate.gates.errors import DataValidationError, InputShapeError
from trojan_gate.gates.oracle import ModelOracle
from trojan_gate.pipelines.benchmarks import hostile_models as hm

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
ORACLE = ModelOracle(hm.benign().SerializeToString())

shapes = st.one_of(st.just((3, 1, 8, 8)), st.just((2, 8, 8)), hnp.array_shapes(min_dims=0, max_dims=5, max_side=9))
dtypes = st.sampled_from([np.float32, np.float64, np.float16, np.int64, np.uint8, np.bool_])
values = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.floats(-2, 2, width=32))


def _filled(shape, dtype, fill):
    if not np.issubdtype(dtype, np.floating) and not np.isfinite(fill):
        fill = 0
    with np.errstate(all="ignore"):
        return np.full(shape, fill).astype(dtype)


@FAST
@given(st.builds(_filled, shapes, dtypes, values))
def test_oracle_inputs_are_in_range_float32_or_refused(x):
    try:
        out = ORACLE.check_inputs(x)
    except InputShapeError:
        return
    assert out.dtype == np.float32 and out.shape[1:] == (1, 8, 8)
    assert np.isfinite(out).all() and (out.size == 0 or (out.min() >= 0 and out.max() <= 1))


@FAST
@given(hnp.arrays(np.float32, st.tuples(st.integers(0, 6), st.just(1), st.just(8), st.just(8)),
                  elements=st.floats(-1.5, 1.5, width=32)))
def test_oracle_answers_probability_rows_for_every_accepted_input(x):
    try:
        p = ORACLE.predict_proba(x)
    except InputShapeError:
        assert x.size and (x.min() < 0 or x.max() > 1)
        return
    assert p.shape == (len(x), hm.K) and np.allclose(p.sum(1), 1.0, atol=1e-5)


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, release_keys):
    from trojan_gate.gates.strip import Strip
    from trojan_gate.plugins.guarded_pyfunc import GuardedModel
    from trojan_gate.plugins.signing import sign_release, write_release

    d = tmp_path_factory.mktemp("release")
    model = d / "m.onnx"
    model.write_bytes(hm.benign().SerializeToString())
    strip = Strip(ModelOracle(model), progress=False).fit(np.random.default_rng(0).random((40, 1, 8, 8), dtype=np.float32))
    strip.infer_threshold(0.05).save(d / "boundary")
    release = write_release(d / "release", model, d / "boundary",
                            {"verdict": "passed", "model_sha256": strip.model_sha256_,
                             "serving": {"policy": "reject", "max_rows": 16}})
    sign_release(release, d / "release.sig")

    class Context:
        artifacts = {"release": str(release), "signature": str(d / "release.sig")}

    m = GuardedModel()
    m.load_context(Context())
    return m


@FAST
@given(st.builds(lambda shape, fill: np.full(shape, fill, np.float32), shapes, values))
def test_a_guarded_request_is_answered_or_refused_as_a_client_error(guarded, x):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, ErrorCode

    try:
        out = guarded.predict(None, x)
    except MlflowException as e:
        assert e.error_code == ErrorCode.Name(INVALID_PARAMETER_VALUE), e.message
        return
    assert list(out.columns) == ["label", "probability", "instance_score", "is_trojaned", "model_calls", "reference_calls"] and len(out) == len(x)


@FAST
@given(st.integers(0, 30), st.sampled_from([np.float32, np.float64, np.int64, np.uint8]),
       st.one_of(st.floats(-1, 2), st.sampled_from([np.nan, np.inf])), st.lists(st.integers(-3, 12), max_size=30))
def test_heldout_validation_reports_or_refuses(n, dtype, fill, labels):
    from trojan_gate.gates.validation import validate_heldout

    x = np.full((n, 1, 8, 8), fill if np.isfinite(fill) or dtype in (np.float32, np.float64) else 0).astype(dtype)
    y = np.asarray((labels * (n // max(1, len(labels)) + 1))[:n] if labels else [0] * n)
    try:
        report = validate_heldout(x, y, (1, 8, 8), 10, min_per_class=1)
    except DataValidationError as e:
        assert e.failures
        return
    assert report.success


@FAST
@given(st.lists(st.text(max_size=20), max_size=4))
def test_option_strings_parse_or_are_refused_naming_the_flag(items):
    from trojan_gate.pipelines.options import parse_options

    try:
        out = parse_options(items, "--scan-option")
    except ValueError as e:
        assert "--scan-option" in str(e)
        return
    assert set(out) <= {i.partition("=")[0].strip() for i in items}


@FAST
@given(st.dictionaries(st.sampled_from(["gate", "scan", "patch", "check", "strip", "gates", "extra"]),
                       st.dictionaries(st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12),
                                       st.integers(0, 3), max_size=3), max_size=3))
def test_settings_with_unknown_keys_are_refused_by_name(doc):
    from trojan_gate.plugins.gate import ConfigError, GateConfig

    try:
        GateConfig.from_dict(doc)
    except ConfigError as e:
        assert any(k in str(e) for section in doc.values() for k in section) or "section" in str(e) \
            or "must" in str(e) or "reserved" in str(e)
