"""The per-class trigger statistic: support ladder, query cost, pruning of a planted trigger."""
import numpy as np
from trojan_gate.gates.oracle import ModelOracle
from trojan_gate.gates.deepinspect.statistic import statistics_cost, support_ladder, trigger_statistics


def test_support_ladder_stops_below_the_input_and_ends_with_it():
    assert support_ladder(64) == [4, 8, 16, 32, 64]
    assert support_ladder(784) == [4, 8, 16, 32, 64, 128, 256, 784]
    assert support_ladder(10, ladder=(16, 4, 4)) == [4, 10]


def test_statistics_cost_counts_every_pass():
    assert statistics_cost(10, 90, 10, 5) == 10 * 5 * 12 * 90


class PlantedGenerator:
    """The lab's true trigger for the target plus dense noise everywhere, as a trained G would
    carry it; other classes get dense noise only."""

    def __init__(self, trigger, target, n_classes=10, noise=0.05):
        self.trigger, self.target, self.n_classes, self.noise = trigger, target, n_classes, noise
        self.input_shape = trigger.pattern.shape

    def sample(self, t, n, seed=0):
        rng = np.random.default_rng(seed)
        out = rng.uniform(-self.noise, self.noise, (n,) + self.input_shape).astype(np.float32)
        if t == self.target:
            out += (self.trigger.mask * self.trigger.pattern).astype(np.float32)
        return out


def test_pruning_cuts_the_noise_from_a_planted_trigger(digits, digits_trojan):
    oracle = ModelOracle(digits_trojan.onnx_bytes)
    trig = digits_trojan.trigger
    gen = PlantedGenerator(trig, target=3)
    x, y = digits[1].x[:200], digits[1].y[:200]
    st = trigger_statistics(oracle, gen, x, y, success_target=0.9, progress=False)
    true_l1 = trig.l1()
    # the noise adds ~0.025 * 64 = 1.6 per image to the dense trigger; the pruned one drops it
    assert st.reached[3]
    assert st.supports[3] < 64
    assert st.statistics[3] < st.dense[3]
    assert st.statistics[3] <= 1.25 * true_l1
    assert st.masks.shape == (10,) + gen.input_shape
    assert st.masks[3].sum() == st.supports[3]
    # noise alone does not move other classes: they keep the upper end max_scale * ||Delta||_1
    others = [t for t in range(10) if t != 3]
    assert not st.reached[others].any()
    assert (st.statistics[others] > st.statistics[3]).all()
    # every pass went to the oracle, within the advertised bound
    assert 0 < oracle.queries <= statistics_cost(10, len(x), 10, len(support_ladder(64)))
