"""Digits pinned-decision exploration (usage: scan_pin_digits.py N_SHADOWS,... WORKERS CACHE_DIR): does a larger digits shadow pool single out the planted patch trojan?"""
import sys, time, json
import torch
torch.set_num_threads(1)
from trojan_gate.gates.data import load_digits_dataset, Dataset
from trojan_gate.gates.lab import LabConfig, train_lab_model
from trojan_gate.gates.metascan import ScanCalibration
from trojan_gate.gates.oracle import ModelOracle

if __name__ == "__main__":
    train, test = load_digits_dataset(seed=0)
    troj = train_lab_model(train, test, LabConfig(arch="small", trigger="patch", targets=(3,), epochs=30, batch_size=64, seed=0), progress=False)
    ben = train_lab_model(train, test, LabConfig(arch="small", trigger="none", epochs=30, batch_size=64, seed=1), progress=False)
    for n in [int(v) for v in sys.argv[1].split(",")]:
        for kw in [dict(epochs=60, n_queries=8, n_images=20), dict(epochs=20, n_queries=4, n_images=10)]:
            t0 = time.time()
            cal = ScanCalibration(n_shadows=n, calibration_share=0.5, false_block_rate=0.1, cache_dir=sys.argv[3],
                                  progress=False, workers=int(sys.argv[2]) if len(sys.argv) > 2 else 1, **kw).fit(test)
            vt = cal.decide(ModelOracle(troj.onnx_bytes), Dataset(test.x, test.y))
            vb = cal.decide(ModelOracle(ben.onnx_bytes), Dataset(test.x, test.y))
            print(json.dumps({"n": n, **kw, "s": round(time.time() - t0, 1), "pool": cal.seconds_, "thr": round(cal.threshold_, 3),
                              "power": cal.power_, "trojan": [round(vt.instance_score, 3), vt.flagged_classes, round(vt.false_block_probability, 3)],
                              "benign": [round(vb.instance_score, 3), vb.false_block_probability]}), flush=True)
