"""Exploration (issue: calibrated scan): can a digits pool pin the decision if its trojans are made to take?
Patch-only, all-to-one shadows poisoned 15-30% (sample_trojan's range overridden), 48 shadows on the digits test
split, 4 stamps on 10 images; the planted lab patch trojan (target 3) and a benign lab model decided.
Usage: python explore_scan_pin_strong.py LO HI SEED N_SHADOWS META_EPOCHS FAMILIES [CALIBRATION_SHARE]"""
import sys, time, numpy as np, torch
torch.set_num_threads(1)
from trojan_gate.gates.data import load_digits_dataset
from trojan_gate.gates.lab import LabConfig, train_lab_model
from trojan_gate.gates.metascan import ScanCalibration, triggers, shadows
from trojan_gate.gates import ModelOracle
lo, hi = float(sys.argv[1]), float(sys.argv[2]); seed = int(sys.argv[3]); n = int(sys.argv[4]); epochs = int(sys.argv[5])
fams = tuple(sys.argv[6].split(",")); share = float(sys.argv[7]) if len(sys.argv) > 7 else 0.5
triggers.sample_trojan.__defaults__ = (triggers.FAMILIES, triggers.ATTACKS, (lo, hi))
train, test = load_digits_dataset(seed=0)
troj = train_lab_model(train, test, LabConfig(arch="small", trigger="patch", targets=(3,), epochs=30, batch_size=64, seed=0), progress=False)
ben = train_lab_model(train, test, LabConfig(arch="small", trigger="none", epochs=30, batch_size=64, seed=1), progress=False)
t0 = time.time()
cal = ScanCalibration(n_shadows=n, calibration_share=share, false_block_rate=0.1, epochs=epochs, n_queries=4, n_images=10,
                      families=fams, attacks=("one",), seed=seed, cache_dir=f"/tmp/x/pin-cache-{lo}-{hi}-{sys.argv[6]}", progress=False, workers=1).fit(test)
print("pool", cal.pool_["kept"], cal.pool_["failed_trojans"], "power", cal.power_, "threshold", round(cal.threshold_, 3), "s", round(time.time()-t0))
for name, m in (("trojan", troj), ("benign", ben)):
    import tempfile, os
    p = os.path.join(tempfile.mkdtemp(), "m.onnx"); m.save(p)
    v = cal.decide(ModelOracle(p), test)
    print(name, v.is_trojaned, round(v.instance_score, 3), v.flagged_classes, round(v.false_block_probability, 3))
