"""Exploration (run-time check): the served model's own penultimate activations as evidence. Per predicted class,
the Mahalanobis distance (shared covariance, Lee et al. 2018) of an input's hidden features from the clean class
mean, fitted on held-out images; FAR at FRR 1%. Lab zoo only (tuning set). Usage: python benchmarks/runtime_activation_check.py watermark,multi3,patch,blend"""
import json, sys
from pathlib import Path
import numpy as np, onnx, onnxruntime as ort, torch
torch.set_num_threads(1)
from onnx import helper, TensorProto
from trojan_gate.gates import ModelOracle
from trojan_gate.gates.data import load_fashion_mnist
from trojan_gate.gates.lab import train_lab_model
from trojan_gate.pipelines.benchmarks.zoo import RUNTIME_MODELS, ZOO, lab_config


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
    triggers = sys.argv[1].split(",")
    epochs, seed = 2, 0
    train, test = load_fashion_mnist(True, limit=30000, seed=0), load_fashion_mnist(False)
    idx = np.random.default_rng([seed, 11]).permutation(len(test))
    held, clean, rest = idx[:4000], idx[4000:6000], idx[6000:]
    fit_part, cal_part = held[:2000], held[2000:]
    out = open("benchmarks/runtime-activation.jsonl", "a")
    for trig in triggers:
        e = ZOO[RUNTIME_MODELS[trig]]
        cfg = lab_config(e, epochs, seed=seed)
        lab = train_lab_model(train, test, cfg, progress=False, threads=1)
        oracle = ModelOracle(lab.onnx_bytes)
        targets = list(cfg.targets)
        troj = rest[~np.isin(test.y[rest], targets)][:2000]
        x_tr = lab.stamp(test.x[troj])
        eff = np.isin(oracle.predict(x_tr), targets)
        sets = {"fit": test.x[fit_part], "cal": test.x[cal_part], "clean": test.x[clean], "trig": x_tr[eff]}
        pred = {k: oracle.predict(v) for k, v in sets.items()}
        s, outs = hidden_session(lab.onnx_bytes)
        F = {k: feats(s, outs, v) for k, v in sets.items()}
        for li, layer in enumerate(outs):
            for labels in ("model", "true"):
                yfit = pred["fit"] if labels == "model" else test.y[fit_part]
                m = Maha().fit(F["fit"][li], yfit, 10)
                sc = {k: m.score(F[k][li], pred[k]) for k in ("cal", "clean", "trig")}
                t = np.quantile(sc["cal"], 0.99, method="higher")
                row = {"trigger": trig, "layer": layer, "dim": int(F["fit"][li].shape[1]), "class_stats": labels,
                       "frr": float(np.mean(sc["clean"] > t)), "far": float(np.mean(sc["trig"] <= t)), "n_trig": int(eff.sum())}
                print(json.dumps(row), flush=True); out.write(json.dumps(row) + "\n"); out.flush()
