"""Left-tail double-MAD test (DeepInspect Eq. 7) against hand-computed values."""
import numpy as np
import pytest
import torch

from trojan_gate.gates.deepinspect.anomaly import (alpha_from_cutoff, cutoff_from_alpha, double_mad_test,
                                       left_deviation_factors)


def test_even_sized_list_uses_numpy_median_not_torch_lower_median():
    s = [1.0, 5.0, 6.0, 7.0, 8.0, 9.0]
    # numpy: mean of the two middle values; torch: the lower one
    assert np.median(s) == 6.5
    assert float(torch.median(torch.tensor(s))) == 6.0
    df, m, mad = left_deviation_factors(s)
    # left subgroup {1, 5, 6}: |s - 6.5| = 5.5, 1.5, 0.5 -> median 1.5 -> mad = 1.4826 * 1.5
    assert m == 6.5
    assert mad == pytest.approx(1.4826 * 1.5)
    expected = [5.5 / 2.2239, 1.5 / 2.2239, 0.5 / 2.2239, 0.0, 0.0, 0.0]
    np.testing.assert_allclose(df, expected, rtol=1e-12)
    assert double_mad_test(s, cutoff=2.0).flagged == [0]  # df 2.473
    # with torch's lower median (6) the left subgroup would be {1, 5} and df(1) = 5 / (1.4826 * 3)
    assert df[0] != pytest.approx(5.0 / (1.4826 * 3.0))


def test_odd_sized_list_hand_computed():
    s = [10.0, 2.0, 9.0, 11.0, 8.0, 12.0, 7.5]
    # median 9; left {2, 8, 7.5}: deviations 7, 1, 1.5 -> median 1.5 -> mad 2.2239
    res = double_mad_test(s)
    assert res.median == 9.0
    assert res.mad == pytest.approx(2.2239)
    np.testing.assert_allclose(res.deviation_factors, [0, 7 / 2.2239, 0, 0, 1 / 2.2239, 0, 1.5 / 2.2239])
    assert res.flagged == [1]


def test_right_tail_is_never_flagged():
    s = [10, 10.5, 9.5, 10.2, 9.8, 100.0]
    res = double_mad_test(s)
    assert res.deviation_factors[-1] == 0.0
    assert res.flagged == []


def test_multi_target_reports_every_outlier():
    s = [1.0, 2.0, 10.0, 10.5, 11.0, 9.5, 10.2, 9.8, 10.1, 10.3]
    # median 10.05; left {1, 2, 9.5, 9.8, 10}: deviations 9.05, 8.05, .55, .25, .05 -> median .55
    res = double_mad_test(s, cutoff=2.0)
    assert res.mad == pytest.approx(1.4826 * 0.55)
    assert res.flagged == [0, 1]
    assert res.deviation_factors[0] == pytest.approx(9.05 / (1.4826 * 0.55))


def test_mad_zero_guard():
    res = double_mad_test([3.0] * 10)
    assert res.mad == 0.0
    assert np.all(res.deviation_factors == 0.0)
    assert res.flagged == []
    # ties at the median and only right-hand values: left subgroup empty
    res = double_mad_test([1.0, 1.0, 1.0, 5.0])
    assert res.mad == 0.0 and res.flagged == []


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        double_mad_test([])
    with pytest.raises(ValueError):
        double_mad_test([1.0, np.nan, 2.0])
    with pytest.raises(ValueError):
        double_mad_test([1.0, 2.0], cutoff=0.0)


def test_alpha_cutoff_mapping():
    # project convention: c = Phi^-1(1 - alpha / 2), so c = 2 <-> alpha = 0.0455
    assert alpha_from_cutoff(2.0) == pytest.approx(0.0455003, abs=1e-7)
    assert cutoff_from_alpha(0.0455003) == pytest.approx(2.0, abs=1e-5)
    assert cutoff_from_alpha(0.05) == pytest.approx(1.959964, abs=1e-6)
    for c in (1.0, 2.0, 2.5, 3.0):
        assert cutoff_from_alpha(alpha_from_cutoff(c)) == pytest.approx(c)
    assert cutoff_from_alpha(0.01) > cutoff_from_alpha(0.05)  # stricter alpha, higher cutoff
    with pytest.raises(ValueError):
        cutoff_from_alpha(0.0)
    with pytest.raises(ValueError):
        alpha_from_cutoff(-1.0)
    assert double_mad_test([1.0, 2.0, 3.0]).alpha == pytest.approx(0.0455003, abs=1e-7)
