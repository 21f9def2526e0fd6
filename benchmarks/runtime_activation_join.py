"""How the activation statistic joins entropy and the student (lab zoo only: the tuning set). Per lab model the check
is fitted once with all three statistics (student distilled on the reference half, activation null fitted on it),
then each variant's full-N decision at preset FRR 1% is read from the same per-statistic values (`check.calibrate`
with the variant's statistics and weights). Usage: python benchmarks/runtime_activation_join.py SEED ARCHS OUT.jsonl"""
import json
import sys
from types import SimpleNamespace

import numpy as np

VARIANTS = {"entropy+reference": (("entropy", "reference"), None),
            "all three, equal": (("entropy", "reference", "activation"), None),
            "all three, 1:2:1": (("entropy", "reference", "activation"), {"entropy": 1, "reference": 2, "activation": 1}),
            "all three, 1:2:2": (("entropy", "reference", "activation"), {"entropy": 1, "reference": 2, "activation": 2}),
            "reference+activation": (("reference", "activation"), None),
            "entropy+activation": (("entropy", "activation"), None),
            "activation": (("activation",), None), "reference": (("reference",), None)}

if __name__ == "__main__":
    import torch

    from trojan_gate.gates import ModelOracle
    from trojan_gate.gates.runtime.activations import ClassFeatureNull
    from trojan_gate.gates.runtime.check import calibrate
    from trojan_gate.gates.runtime.detector import RuntimeCheck
    from trojan_gate.gates.runtime.student import distil_student
    from trojan_gate.pipelines.benchmarks.runtime_models import lab_subjects
    from trojan_gate.pipelines.benchmarks.zoo import RUNTIME_MODELS

    torch.set_num_threads(1)
    seed, archs, out_path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    args = SimpleNamespace(triggers=",".join(RUNTIME_MODELS), archs=archs, epochs=2, train_limit=30000, heldout=4000,
                           n_eval=2000, seed=seed, threads=1)
    with open(out_path, "a") as out:
        for s in lab_subjects(args):
            oracle = ModelOracle(s.onnx)
            (ref_x, _), (cal_x, cal_y) = s.halves()
            eff = np.isin(oracle.predict(s.stamped_x), s.targets)
            p, h = oracle.proba_and_hidden(ref_x)
            null = ClassFeatureNull().fit(h, p.argmax(1), oracle.n_classes)
            student = distil_student(oracle, ref_x, seed=seed)
            rc = RuntimeCheck(oracle, statistics=("entropy", "reference", "activation"), seed=seed, reference=student,
                              activation_null=null, progress=False).fit(cal_x, cal_y)
            n = rc.n_perturbations
            clean, trig = rc._stage_statistics(s.clean_x)[n], rc._stage_statistics(s.stamped_x[eff])[n]
            row = {"trigger": s.trigger, "arch": s.arch, "seed": seed, "n_stamped": int(eff.sum())}
            for name, (stats, weights) in VARIANTS.items():
                cal = calibrate({n: {k: rc.stage_values_[n][k] for k in stats}}, 0.01, (), weights=weights)
                flag = {k: cal.combined(n, {st: v[st] for st in stats}) <= cal.threshold
                        for k, v in (("clean", clean), ("trig", trig))}
                row[name] = [float(flag["clean"].mean()), float(1 - flag["trig"].mean())]
            print(json.dumps(row), flush=True)
            out.write(json.dumps(row) + "\n")
            out.flush()
