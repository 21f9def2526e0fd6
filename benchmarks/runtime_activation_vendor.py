"""One measurement of the activation statistic (fixed on the lab zoo: the input of the last dense layer, Mahalanobis
per predicted class with a shared covariance, fitted on the reference half, threshold at the calibration half's 99th
percentile) on the vendor-like test zoo, seed 0. Usage: python benchmarks/runtime_activation_vendor.py MODELS ZOO_DIR"""
import json, sys
from types import SimpleNamespace
import numpy as np
from trojan_gate.gates import ModelOracle
from trojan_gate.pipelines.benchmarks.runtime_models import vendor_subjects
import onnx, onnxruntime as ort
from onnx import helper, TensorProto


def hidden_session(onnx_bytes):
    m = onnx.load_from_string(onnx_bytes)
    nodes = [n for n in m.graph.node if n.op_type in ("Gemm", "MatMul")]
    outs = []
    for n in nodes[-2:]:  # inputs of the last two dense layers
        outs.append(n.input[0])
        m.graph.output.append(helper.make_tensor_value_info(n.input[0], TensorProto.FLOAT, None))
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return s, outs


def feats(s, outs, x):
    name = s.get_inputs()[0].name
    res = [s.run(outs, {name: x[i:i + 512]}) for i in range(0, len(x), 512)]
    return [np.concatenate([r[k] for r in res]).reshape(len(x), -1) for k in range(len(outs))]


class Maha:
    def fit(self, f, y, k):
        self.mu = np.stack([f[y == c].mean(0) for c in range(k)])
        d = f - self.mu[y]
        cov = d.T @ d / len(f) + 1e-3 * np.eye(f.shape[1])
        self.prec = np.linalg.inv(cov)
        return self

    def score(self, f, pred):  # higher = farther from the predicted class
        d = f - self.mu[pred]
        return np.einsum("ij,jk,ik->i", d, self.prec, d)



if __name__ == "__main__":
    args = SimpleNamespace(models=sys.argv[1], seed=0, n_eval=2000, zoo_dir=sys.argv[2])
    for s in vendor_subjects(args):
        oracle = ModelOracle(s.onnx)
        (rx, ry), (cx, cy) = s.halves()
        eff = np.isin(oracle.predict(s.stamped_x), s.targets)
        sets = {"fit": rx, "cal": cx, "clean": s.clean_x, "trig": s.stamped_x[eff]}
        pred = {k: oracle.predict(v) for k, v in sets.items()}
        sess, outs = hidden_session(s.onnx)
        F = {k: feats(sess, outs, v)[-1] for k, v in sets.items()}
        m = Maha().fit(F["fit"], pred["fit"], 10)
        sc = {k: m.score(F[k], pred[k]) for k in ("cal", "clean", "trig")}
        t = np.quantile(sc["cal"], 0.99, method="higher")
        row = {"model": s.name, "layer": outs[-1], "dim": int(F["fit"].shape[1]), "frr": float(np.mean(sc["clean"] > t)),
               "far": float(np.mean(sc["trig"] <= t)), "n_trig": int(eff.sum())}
        print(json.dumps(row), flush=True)
