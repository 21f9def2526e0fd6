"""Exploration (issue: run-time check, second design): what the student disagreement misses on the lab watermark
(small CNN, seed 0): the served model's and the student's answers on the stamped inputs below the clean 1% JS cut."""
import sys, numpy as np, torch
from types import SimpleNamespace
from trojan_gate.gates import ModelOracle
from trojan_gate.gates.runtime.evidence import js_bits
from trojan_gate.gates.runtime.student import distil_student
from trojan_gate.gates.runtime.activations import HiddenFeatures
from trojan_gate.pipelines.benchmarks.runtime_models import lab_subjects
torch.set_num_threads(2)
args = SimpleNamespace(triggers="watermark", archs="small", epochs=2, train_limit=30000, heldout=4000, n_eval=2000, seed=0, threads=2)
for s in lab_subjects(args):
    o = ModelOracle(s.onnx); (rx,_),(cx,cy) = s.halves()
    st = HiddenFeatures(distil_student(o, rx, seed=0))
    eff = np.isin(o.predict(s.stamped_x), s.targets); xs = s.stamped_x[eff]
    # source labels of stamped: recompute from lab_subjects internals is not exposed; use student on unstamped? not available
    pc, rc_ = o.predict_proba(cx), st(cx)[0]; thr = np.quantile(-js_bits(pc, rc_), 0.01)
    ps, rs = o.predict_proba(xs), st(xs)[0]
    js = js_bits(ps, rs); miss = -js > thr
    t = s.targets[0]
    print("targets", s.targets, "miss share", miss.mean(), "thr js", -thr)
    print("student says target: miss", (rs.argmax(1)[miss]==t).mean(), "caught", (rs.argmax(1)[~miss]==t).mean())
    print("f max prob: miss", np.median(ps.max(1)[miss]), "caught", np.median(ps.max(1)[~miss]), "clean", np.median(pc.max(1)))
    print("r max prob: miss", np.median(rs.max(1)[miss]), "caught", np.median(rs.max(1)[~miss]))
    print("r prob of target: miss", np.median(rs[miss, t]), "caught", np.median(rs[~miss, t]))
    print("student label dist of misses", np.bincount(rs.argmax(1)[miss], minlength=10))
    print("student label dist of caught", np.bincount(rs.argmax(1)[~miss], minlength=10))
    # clean disagreement pairs
    d = pc.argmax(1) != rc_.argmax(1)
    print("clean disagree", d.mean(), "f label of clean disagreements", np.bincount(pc.argmax(1)[d], minlength=10))
    print("clean top-1% JS: f labels", np.bincount(pc.argmax(1)[-js_bits(pc, rc_) <= thr], minlength=10))
