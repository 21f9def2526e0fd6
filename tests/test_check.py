"""`trojan-gate check`: exit codes, output file, same answers as the GuardedClassifier."""
import json

import numpy as np
import onnx
import pytest

from trojan_gate.gates.strip.artifact import BANK_FILE, BOUNDARY_FILE
from trojan_gate.gates.data import load_digits_dataset
from trojan_gate.gates.guard import GuardedClassifier
from trojan_gate.gates.lab import LabConfig, train_lab_model
from trojan_gate.gates.oracle import ModelOracle
from trojan_gate.gates.strip import Strip, artifact_sha256
from trojan_gate.pipelines.cli import main


def train_lab(train, test, config):
    return train_lab_model(train, test, config, progress=False, threads=1)  # one thread: faster on a small shared machine


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("check")
    train, test = load_digits_dataset(seed=0)
    lab = train_lab(train, test, LabConfig(trigger="patch", targets=(0,), epochs=30, batch_size=64))
    model = lab.save(root / "model.onnx")
    swapped = onnx.load_from_string(lab.onnx_bytes)  # the same network, re-saved: a different file
    swapped.doc_string = "swapped"
    other = root / "other.onnx"
    other.write_bytes(swapped.SerializeToString())
    oracle = ModelOracle(model)
    held, ev = test.x[:250], test.subset(np.arange(250, len(test)))
    det = Strip(oracle, n_perturbations=10, seed=0, progress=False).fit(held).infer_threshold(0.01)
    det.save(root / "boundary")
    clean_scores = det.score(ev.x)
    clean = ev.x[np.argsort(clean_scores)[:15]]  # clearly benign: the lowest-scoring (highest-entropy) clean inputs
    stamped = lab.stamp(ev.x[ev.y != 0][:30])
    np.savez(root / "clean.npz", x=clean)
    np.savez(root / "mixed.npz", x=np.concatenate([clean, stamped]))
    return {"root": root, "model": model, "other": other, "boundary": root / "boundary"}


def run_check(setup, inputs, out, *extra):
    return main(["check", str(setup["model"]), "--boundary", str(setup["boundary"]),
                 "--inputs", str(setup["root"] / inputs), "--out", str(out), *extra])


def test_clean_inputs_exit_0(setup, tmp_path, capsys):
    out = tmp_path / "r.npz"
    assert run_check(setup, "clean.npz", out) == 0
    r = np.load(out)
    assert set(r.files) == {"instance_score", "is_trojaned", "label", "probability", "model_calls", "reference_calls"}
    assert (r["model_calls"] == 11).all()  # STRIP: the input and its N = 10 copies
    assert r["instance_score"].shape == (15,) and not r["is_trojaned"].any()
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["flagged"] == 0


def test_flagged_inputs_exit_1_and_match_guard(setup, tmp_path):
    out = tmp_path / "r.npz"
    assert run_check(setup, "mixed.npz", out) == 1
    r = np.load(out)
    assert r["is_trojaned"].dtype == bool and r["label"].dtype == np.int64
    assert r["is_trojaned"][15:].mean() > 0.8 and not r["is_trojaned"][:15].any()
    # the same code path as serving: a fresh guard from the same artifact answers identically
    guard = GuardedClassifier.from_artifacts(setup["model"], setup["boundary"])
    g = guard.predict(np.load(setup["root"] / "mixed.npz")["x"])
    np.testing.assert_array_equal(r["instance_score"], g["instance_score"])
    np.testing.assert_array_equal(r["is_trojaned"], g["is_trojaned"])
    np.testing.assert_array_equal(r["label"], g["label"])
    np.testing.assert_array_equal(r["is_trojaned"], r["instance_score"] >= guard.threshold)


def test_reject_policy_gives_minus_one(setup, tmp_path):
    out = tmp_path / "r.npz"
    assert run_check(setup, "mixed.npz", out, "--policy", "reject") == 1
    r = np.load(out)
    assert (r["label"][r["is_trojaned"]] == -1).all()
    assert (r["label"][~r["is_trojaned"]] >= 0).all()


def test_pinned_artifact_sha(setup, tmp_path, capsys):
    sha = artifact_sha256(setup["boundary"])
    assert run_check(setup, "clean.npz", tmp_path / "a.npz", "--expected-sha256", sha) == 0
    assert run_check(setup, "clean.npz", tmp_path / "b.npz", "--expected-sha256", "f" * 64) == 2
    assert "artifact sha256 mismatch" in capsys.readouterr().err


def test_tampered_artifact_exit_2(setup, tmp_path, capsys):
    import shutil

    bad = tmp_path / "boundary"
    shutil.copytree(setup["boundary"], bad)
    doc = json.loads((bad / BOUNDARY_FILE).read_text())
    doc["threshold"] = 5.0
    (bad / BOUNDARY_FILE).write_text(json.dumps(doc))
    out = tmp_path / "r.npz"
    code = main(["check", str(setup["model"]), "--boundary", str(bad), "--inputs", str(setup["root"] / "mixed.npz"),
                 "--out", str(out)])
    assert code == 2 and not out.exists()
    assert "ArtifactIntegrityError" in capsys.readouterr().err
    shutil.copyfile(setup["boundary"] / BOUNDARY_FILE, bad / BOUNDARY_FILE)
    np.save(bad / BANK_FILE, np.zeros((3, 1, 8, 8), np.float32))
    code = main(["check", str(setup["model"]), "--boundary", str(bad), "--inputs", str(setup["root"] / "mixed.npz"),
                 "--out", str(out)])
    assert code == 2 and "bank.npy sha256 mismatch" in capsys.readouterr().err


def test_wrong_model_and_bad_inputs_exit_2(setup, tmp_path, capsys):
    out = tmp_path / "r.npz"
    code = main(["check", str(setup["other"]), "--boundary", str(setup["boundary"]),
                 "--inputs", str(setup["root"] / "clean.npz"), "--out", str(out)])
    assert code == 2 and "model sha256 mismatch" in capsys.readouterr().err
    np.savez(tmp_path / "wrong.npz", x=np.zeros((2, 1, 5, 5), np.float32))
    code = main(["check", str(setup["model"]), "--boundary", str(setup["boundary"]),
                 "--inputs", str(tmp_path / "wrong.npz"), "--out", str(out)])
    assert code == 2 and "InputShapeError" in capsys.readouterr().err


def test_chunked_check_writes_what_one_chunk_writes(setup, tmp_path):
    whole, chunked = tmp_path / "whole.npz", tmp_path / "chunked.npz"
    assert run_check(setup, "mixed.npz", whole) == 1
    assert run_check(setup, "mixed.npz", chunked, "--chunk-size", "7") == 1
    a, b = np.load(whole), np.load(chunked)
    for key in a.files:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert (a["reference_calls"] == 0).all()  # STRIP asks no reference classifier


def test_an_input_refused_midway_leaves_no_output(setup, tmp_path, capsys):
    x = np.load(setup["root"] / "mixed.npz")["x"].copy()
    x[-1, 0, 0, 0] = 2.0  # out of range, in the last chunk
    np.savez(tmp_path / "late.npz", x=x)
    out = tmp_path / "r.npz"
    code = main(["check", str(setup["model"]), "--boundary", str(setup["boundary"]), "--inputs",
                 str(tmp_path / "late.npz"), "--out", str(out), "--chunk-size", "5"])
    assert code == 2 and "InputRangeError" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [tmp_path / "late.npz"]  # neither the output nor its temporary folder


def test_check_imports_neither_torch_nor_scipy(setup, tmp_path):
    import subprocess
    import sys

    code = ("import sys; from trojan_gate.pipelines.cli import main; "
            f"rc = main(['check', {str(setup['model'])!r}, '--boundary', {str(setup['boundary'])!r}, '--inputs', "
            f"{str(setup['root'] / 'clean.npz')!r}, '--out', {str(tmp_path / 'r.npz')!r}]); "
            "heavy = sorted(m for m in ('torch', 'scipy', 'great_expectations', 'mlflow') if m in sys.modules); "
            "print(rc, heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "0 []"
