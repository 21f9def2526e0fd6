"""Residual-risk evidence for a patched model: universal-trigger search, the acceptance rules, the gate's use."""
import numpy as np
import pytest
import torch

from trojan_gate.gates.patching import Patcher, ResidualRisk, assess_residual, onnx_to_torch
from trojan_gate.gates.patching.acceptance import judge
from trojan_gate.gates.patching.universal import UNTARGETED, UniversalTrigger, attack_success, project_mask, search
from trojan_gate.gates.patching.unlearning import unlearn


def test_judge_rules_by_hand():
    # rule 1: flagged class 0 still reached far more than any other class
    ok, reasons = judge({"mask": {0: 0.9, 1: 0.2, 2: 0.25, 3: 0.1, UNTARGETED: 0.3}}, [0], ratio=3.0, floor=0.3,
                        margin=0.05)
    assert not ok and any("flagged class 0" in r for r in reasons) and any("class 0 stands out" in r for r in reasons)
    # within the margin of the strongest unflagged class, nothing stands out: accepted
    ok, reasons = judge({"mask": {0: 0.2, 1: 0.24, 2: 0.21, 3: 0.19}}, [1], ratio=3.0, floor=0.3, margin=0.05)
    assert ok and reasons == []
    # rule 2: a class the scan did not flag stands out (0.5 > max(3 x 0.1, 0.3))
    ok, reasons = judge({"additive": {0: 0.5, 1: 0.1, 2: 0.1, 3: 0.1}}, [1], ratio=3.0, floor=0.3, margin=0.05)
    assert not ok and reasons == ["additive: class 0 stands out: 50% against a median of 10% (more than 3x and "
                                  "more than 30%)"]
    # rule 1 needs a contrast: with most classes flagged it does not apply (rule 2 still does)
    ok, _ = judge({"mask": {0: 0.25, 1: 0.1, 2: 0.12, 3: 0.11}}, [0, 1, 2], ratio=3.0, floor=0.3, margin=0.05)
    assert ok
    # under the floor no class counts as standing out, whatever the ratio
    ok, _ = judge({"additive": {0: 0.25, 1: 0.05, 2: 0.05, 3: 0.05}}, [1], ratio=3.0, floor=0.3, margin=0.05)
    assert ok


def test_project_mask_keeps_the_budgets_largest_entries():
    m = torch.tensor([[[[0.9, 0.8], [0.7, 0.1]]]])
    out = project_mask(m, 0.5)  # 2 of 4 pixels
    assert torch.equal(out, torch.tensor([[[[0.9, 0.8], [0.0, 0.0]]]]))
    small = torch.full((1, 1, 2, 2), 0.1)
    assert torch.equal(project_mask(small, 0.5), small)  # within budget: unchanged


def test_an_untargeted_trigger_counts_images_moved_off_their_label():
    class Constant(torch.nn.Module):  # always answers class 1
        def forward(self, x):
            return torch.log_softmax(torch.tensor([[0.0, 5.0]]).repeat(len(x), 1), 1)

    x = torch.zeros((4, 1, 2, 2))
    trig = UniversalTrigger("additive", UNTARGETED, delta=torch.zeros((1, 1, 2, 2)))
    assert attack_success(Constant(), trig, x, y=torch.tensor([0, 0, 1, 1])) == 0.5
    with pytest.raises(ValueError, match="labels"):
        search(Constant(), x, UNTARGETED, "additive", 0.1, steps=1)
    with pytest.raises(ValueError, match="family"):
        search(Constant(), x, 0, "warp", 0.1, steps=1)


def test_the_search_finds_a_planted_trigger_and_the_check_refuses_it(digits, digits_trojan, digits_benign):
    _, test = digits
    torch.manual_seed(0)
    ladder = (0.3, 0.15, 0.08, 0.04)  # 8x8 images: 19 down to 3 pixels
    trojan = assess_residual(onnx_to_torch(digits_trojan.onnx_bytes), test.x, test.y, [3], mask_area=0.1, steps=60,
                             area_ladder=ladder, area_steps=40)
    s = trojan.summary()["mask"]
    assert not trojan.accepted and s["max_flagged"] >= 0.5 and s["max_flagged"] > s["max_unflagged"] + 0.05
    assert trojan.strongest["mask"][UNTARGETED] is not None and trojan.n_images == len(test.y)
    ai = trojan.anomaly_index()  # rule (3): the planted target needs the smallest trigger of all classes
    assert max(ai, key=ai.get) == 3 and set(trojan.areas) == set(range(10))
    benign = assess_residual(onnx_to_torch(digits_benign.onnx_bytes), test.x, test.y, [3], mask_area=0.1, steps=60,
                             area_ladder=ladder, area_steps=40)
    assert benign.summary()["mask"]["max_flagged"] < s["max_flagged"]
    assert benign.areas[3] > trojan.areas[3]
    d = trojan.to_dict()
    assert d["summary"]["mask"]["max_flagged"] == s["max_flagged"] and "3" in d["strongest"]["mask"]


def test_universal_unlearning_lowers_the_planted_triggers_success_and_keeps_accuracy(digits, digits_trojan):
    train, test = digits
    clf = onnx_to_torch(digits_trojan.onnx_bytes)
    stamped = digits_trojan.trigger.apply(test.x[test.y != 3])
    before = float((clf(torch.from_numpy(stamped)).argmax(1) == 3).float().mean())
    acc0 = float((clf(torch.from_numpy(test.x)).argmax(1).numpy() == test.y).mean())
    rounds = []
    unlearn(clf, train.x, train.y, {"mask": 0.1, "additive": 0.1}, rounds=6, lr=1e-3, distill_weight=3.0, seed=0,
            on_round=lambda r, st: rounds.append(st))
    with torch.no_grad():
        after = float((clf(torch.from_numpy(stamped)).argmax(1) == 3).float().mean())
        acc1 = float((clf(torch.from_numpy(test.x)).argmax(1).numpy() == test.y).mean())
    assert len(rounds) == 6 and before > 0.9 and after < before / 2 and acc1 > acc0 - 0.05


def test_patcher_refuses_bad_residual_settings():
    for bad in ({"universal_rounds": -1}, {"residual_mask_area": 0.0}, {"residual_ratio": 0.5},
                {"residual_floor": 2.0}, {"residual_steps": 0}, {"residual_area_ladder": (0.01, 0.05)},
                {"residual_area_ladder": (0.1, 0.0)}, {"residual_anomaly": 0.0}):
        with pytest.raises(ValueError):
            Patcher(**bad)._check()


def test_residual_tags_state_the_evidence():
    from trojan_gate.plugins.gate.steps import residual_tags

    r = ResidualRisk(budgets={"mask": 0.05, "additive": 0.12}, strongest={"mask": {0: 0.8, 1: 0.1, UNTARGETED: 0.2},
                     "additive": {0: 0.1, 1: 0.1, UNTARGETED: 0.05}}, flagged_classes=[0], ratio=3.0, floor=0.3,
                     margin=0.05, accepted=False, reasons=["x"])
    tags = residual_tags(r)
    assert tags["patch.residual.accepted"] == "false"
    assert tags["patch.residual.mask"] == "budget 0.05: flagged 0.800, other 0.100, untargeted 0.200"
    assert residual_tags(None) == {"patch.residual.accepted": "not measured"}
    assert np.isclose(r.summary()["additive"]["median"], 0.1)
    assert "patch.residual.area" not in tags  # rule (3) not measured
    r.areas = {0: 0.005, 1: 0.04, 2: 0.05, 3: 0.06}
    assert residual_tags(r)["patch.residual.area"].startswith("smallest mask area for half the images: class 0 0.0050")
    assert r.to_dict()["areas"]["0"] == 0.005 and r.to_dict()["anomaly_index"]["0"] > 2


def test_area_rule_by_hand():
    from trojan_gate.gates.patching.acceptance import area_anomaly, judge_areas

    # nine classes near 5% and one at 0.5%: log-median 0.05, MAD ~0, the scale floored at log 2
    areas = {t: 0.05 for t in range(9)} | {9: 0.005}
    ai = area_anomaly(areas)
    assert np.isclose(ai[9], np.log(10) / np.log(2)) and ai[0] == 0.0
    reasons = judge_areas(areas, 2.0)
    assert len(reasons) == 1 and reasons[0].startswith("mask area: class 9 is reached by half of the images with 0.50%")
    # a class at half the median is inside the bound; a spread-out task raises the scale
    assert judge_areas({t: 0.05 for t in range(9)} | {9: 0.025}, 2.0) == []
    spread = {0: 0.005, 1: 0.01, 2: 0.02, 3: 0.04, 4: 0.08, 5: 0.16}
    assert judge_areas(spread, 2.0) == [] and area_anomaly({}) == {}


def test_smallest_area_is_small_for_a_planted_trigger_and_refuses_a_bad_ladder(digits, digits_trojan, digits_benign):
    from trojan_gate.gates.patching.universal import smallest_area

    _, test = digits
    others = torch.from_numpy(test.x[test.y != 3])
    fit, held = others[: len(others) // 2], others[len(others) // 2:]
    ladder = (0.3, 0.15, 0.08, 0.04)
    gen = torch.Generator().manual_seed(0)
    a_trojan, curve = smallest_area(onnx_to_torch(digits_trojan.onnx_bytes), fit, held, 3, areas=ladder, steps=60,
                                    refine_steps=40, gen=gen)
    a_benign, _ = smallest_area(onnx_to_torch(digits_benign.onnx_bytes), fit, held, 3, areas=ladder, steps=60,
                                refine_steps=40, gen=gen)
    assert len(curve) == len(ladder) and curve[0] >= 0.5
    assert a_trojan < a_benign and a_trojan <= 0.15
    with pytest.raises(ValueError, match="descending"):
        smallest_area(onnx_to_torch(digits_benign.onnx_bytes), fit, held, 3, areas=(0.01, 0.1))


def test_reverse_engineered_triggers_single_out_the_planted_target_and_their_unlearning_removes_it(digits,
                                                                                                  digits_trojan):
    from trojan_gate.gates.patching.unlearning import reverse_engineer, reversed_stamps

    train, test = digits
    clf = onnx_to_torch(digits_trojan.onnx_bytes)
    triggers, areas, chosen = reverse_engineer(clf, train.x, train.y, (0.3, 0.15, 0.08, 0.04), anomaly=2.0,
                                               fallback=[5], steps=40, seed=0)
    assert chosen == [3] and min(areas, key=areas.get) == 3 and set(triggers) == set(range(10))
    stamped = torch.from_numpy(digits_trojan.trigger.apply(test.x[test.y != 3]))
    with torch.no_grad():
        before = float((clf(stamped).argmax(1) == 3).float().mean())
    unlearn(clf, train.x, train.y, {}, rounds=4, lr=1e-3, distill_weight=3.0, seed=0,
            extra=reversed_stamps(triggers, chosen))
    with torch.no_grad():
        after = float((clf(stamped).argmax(1) == 3).float().mean())
        acc = float((clf(torch.from_numpy(test.x)).argmax(1).numpy() == test.y).mean())
    assert before > 0.9 and after < before / 2 and acc > 0.85
    # with no class standing out, the fallback (the scan's flagged classes) is unlearned
    flat = reverse_engineer(clf, train.x, train.y, (0.3, 0.15), anomaly=50.0, fallback=[5, 7], steps=5, seed=0)
    assert flat[2] == [5, 7]
