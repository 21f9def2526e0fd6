"""Co-targets of a multi-target trojan: co-activation on a real ONNX model, link strength, closure."""
import numpy as np
import pytest

from trojan_gate.gates.deepinspect.cotargets import (DEFAULT_LINK_THRESHOLD, anomalous_links, co_activation, co_activation_cost,
                                         co_targets, link_strength, triangle_members)
from trojan_gate.gates.lab import LabConfig, make_trigger, train_lab_model
from trojan_gate.gates.oracle import ModelOracle

TARGETS = (1, 4, 7)


class TrueTriggerGenerator:
    """Stands in for a trained G(z, t): the lab's real white patch for the classes in `stamped`, nothing elsewhere."""

    def __init__(self, in_shape, stamped, n_classes=10):
        self.n_classes = n_classes
        self.stamped = set(stamped)
        trig = make_trigger("patch", in_shape)
        self.patch = (trig.mask * trig.pattern).astype(np.float32)  # clip(x + patch) = white patch

    def sample(self, t, n, seed=0):
        d = self.patch if t in self.stamped else np.zeros_like(self.patch)
        return np.repeat(d[None], n, axis=0)


@pytest.fixture(scope="module")
def digits_multi(digits):
    """The paper's multi-target BadNets trojan on digits: one patch, target drawn from (1, 4, 7)."""
    train, test = digits
    return train_lab_model(train, test, LabConfig(arch="small", trigger="patch", targets=TARGETS, epochs=30,
                                                  batch_size=64, seed=0), progress=False)


def test_link_strength_is_the_geometric_mean_of_both_directions():
    a = np.array([[0.0, 0.09, 0.20],
                  [0.04, 0.0, 0.0],
                  [0.05, 0.5, 0.0]])
    w = link_strength(a)
    assert w[0, 1] == pytest.approx(0.06) and w[1, 0] == pytest.approx(0.06)
    assert w[0, 2] == pytest.approx(0.1)
    assert w[1, 2] == 0.0  # one-sided: 2's trigger lifts 1, 1's trigger never lifts 2
    assert np.all(np.diag(w) == 0)


def test_co_targets_follow_chains_of_links_from_flagged_classes_only():
    w = np.zeros((6, 6))
    for i, j, v in [(0, 2, 0.05), (2, 4, DEFAULT_LINK_THRESHOLD), (1, 3, 0.2), (4, 5, 0.034)]:
        w[i, j] = w[j, i] = v
    assert co_targets([0], w) == [2, 4]  # 0-2 and 2-4 (at the threshold); 4-5 below it
    assert co_targets([2, 0], w) == [4]  # only classes not already flagged
    assert co_targets([5], w) == []
    assert co_targets([], w) == []  # links never start a flag
    assert co_targets([0], w, threshold=0.03) == [2, 4, 5]


def test_with_references_a_link_must_also_stand_far_above_its_natural_level():
    w = np.zeros((4, 4))
    w[0, 1] = w[1, 0] = 0.06  # natural level 0.03 on the references: only 2x
    w[2, 3] = w[3, 2] = 0.06  # natural level 0.01: 6x
    refs = np.zeros((2, 4, 4))
    refs[:, 0, 1] = refs[:, 1, 0] = [0.02, 0.04]
    refs[:, 2, 3] = refs[:, 3, 2] = [0.0, 0.02]
    plain = anomalous_links(w)
    assert plain[0, 1] and plain[2, 3] and not plain.diagonal().any()
    g = anomalous_links(w, refs, reference_factor=3.0)  # (default 10)
    assert g.dtype == bool and not g[0, 1] and g[2, 3] and g[3, 2]
    assert co_targets([2], g) == [3] and co_targets([0], g) == []
    assert not anomalous_links(w, refs, threshold=0.07).any()  # the absolute floor still holds


def test_only_three_classes_linked_pairwise_stand_on_their_own():
    g = np.zeros((6, 6), bool)
    for i, j in [(0, 1), (1, 2), (0, 2), (3, 4), (4, 5)]:  # a triangle 0-1-2, and a chain 3-4-5
        g[i, j] = g[j, i] = True
    assert triangle_members(g) == [0, 1, 2]
    g[3, 5] = True  # one direction only is not a link
    assert triangle_members(g) == [0, 1, 2]
    g[5, 3] = True
    assert triangle_members(g) == [0, 1, 2, 3, 4, 5]
    assert triangle_members(np.zeros((4, 4), bool)) == []


def test_a_shared_trigger_links_its_targets_on_the_oracle(digits, digits_multi):
    _, test = digits
    x, y = test.x[:300], test.y[:300]
    oracle = ModelOracle(digits_multi.onnx_bytes)
    a = co_activation(oracle, TrueTriggerGenerator(x.shape[1:], TARGETS), x, y, progress=False)
    assert a.shape == (10, 10) and np.all(np.diag(a) == 0) and np.all((a >= 0) & (a <= 1))
    assert oracle.queries == sum(int((y != t).sum()) for t in range(10))  # one pass per class
    # a ~ K(K-1) n_per_class on a balanced set: the budget's reserve
    assert oracle.queries <= co_activation_cost(10, 9 * int(np.bincount(y).max()))
    # by hand for one pair: images of classes other than 1 and 4, stamped, probability of 4
    keep = (y != 1) & (y != 4)
    stamped = np.clip(x[keep] + TrueTriggerGenerator(x.shape[1:], TARGETS).patch, 0, 1)
    assert a[1, 4] == pytest.approx(ModelOracle(digits_multi.onnx_bytes).predict_proba(stamped)[:, 4].mean())
    w = link_strength(a)
    inside = [w[i, j] for i in TARGETS for j in TARGETS if i < j]
    outside = np.delete(np.delete(w, list(TARGETS), 0), list(TARGETS), 1)
    assert min(inside) >= DEFAULT_LINK_THRESHOLD
    assert outside.max() < DEFAULT_LINK_THRESHOLD
    for flagged in TARGETS:  # whichever target the double-MAD test found, the other two follow
        assert co_targets([flagged], w) == sorted(set(TARGETS) - {flagged})
    assert triangle_members(anomalous_links(w)) == list(TARGETS)  # and with references, on their own


def test_a_single_target_trigger_links_to_nothing(digits, digits_trojan):
    _, test = digits
    x, y = test.x[:300], test.y[:300]
    oracle = ModelOracle(digits_trojan.onnx_bytes)
    a = co_activation(oracle, TrueTriggerGenerator(x.shape[1:], (3,)), x, y, progress=False)
    assert digits_trojan.attack_success_rate > 0.9
    assert a[3].sum() < 0.1  # stamped images go to 3 (the diagonal is not recorded), not elsewhere
    assert co_targets([3], link_strength(a)) == []
    assert triangle_members(anomalous_links(link_strength(a))) == []
