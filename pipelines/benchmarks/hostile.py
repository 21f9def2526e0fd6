"""`trojan-gate benchmark hostile`: the hostile corpus against a real local MLflow store.

Every case of `hostile_models` (and a few attacks on the registry and serving path) goes through
the product as an attacker would use it: intake, gate, promote, the guarded model. Per case the
table gives the outcome: refused (with the named cause), survived (the attack on the receiver,
queue or watcher held, with what held), crashed (an error the project did not name), promoted (an
alias on an attacker's version), served unchecked (a request answered with a label that should
have been refused or flagged) or hung (past its deadline). The last four must be 0. The attacks on
the automation and release path are in `hostile_automation`.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from . import hostile_models as hm

HELP = "hostile models, data and requests against intake, gate, promote and serving: refused / crashed / promoted / served unchecked"


def add_arguments(p):
    p.add_argument("--out", default=None, help="also write the markdown table here")
    p.add_argument("--workdir", default=None, help="where the temporary store goes (default: a temp dir)")


def _outcome(fn):
    """Run one case: ("refused", cause) for a named refusal, ("crashed", ...) for anything else."""
    from trojan_gate.gates.errors import TrojanGateError

    try:
        return fn()
    except TrojanGateError as e:
        reason = getattr(e, "cause", "") or (e.failures[0] if getattr(e, "failures", None) else str(e))
        return "refused", f"{type(e).__name__}: {' '.join(str(reason).split())[:110]}"
    except Exception as e:  # not a named refusal: a crash, whatever it was
        return "crashed", f"{type(e).__name__}: {str(e)[:120]}"


def run(args) -> int:
    import logging

    import mlflow

    from trojan_gate.gates.data import load_digits_dataset, load_heldout

    logging.getLogger("mlflow.models.utils").setLevel(logging.ERROR)  # the ignored `params` are the point
    from trojan_gate.plugins.gate import GateConfig, run_gate
    from trojan_gate.plugins.guarded_pyfunc import load_release
    from trojan_gate.plugins.promotion import PromotionRefused, promote
    from trojan_gate.plugins.registry import configure_tracking, intake_onnx, version_tags
    from trojan_gate.plugins.serving import ServingRefused, check_servable
    from trojan_gate.plugins.signing import SIGNING_KEY_ENV, VERIFY_KEY_ENV, generate_keypair

    work = Path(args.workdir or tempfile.mkdtemp(prefix="trojan-gate-hostile-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    private, public = generate_keypair(work / "keys")
    os.environ[SIGNING_KEY_ENV], os.environ[VERIFY_KEY_ENV] = str(private), str(public)
    configure_tracking(f"sqlite:///{work / 'mlflow.db'}")
    _, test = load_digits_dataset(seed=0)
    heldout = test
    cheap = GateConfig(scan={"use_heldout": False, "options": {"n_per_class": 5, "generator_steps": 40}})
    rows = []

    def model_case(case):
        path = work / f"{case.name}.onnx"
        path.write_bytes(case.build().SerializeToString())
        ref = intake_onnx(path, case.name)
        out = run_gate(ref.uri, heldout, cheap)
        promoted = False
        if out.verdict in ("passed", "patched"):
            try:
                promote(ref.name, ref.version, alias="production")
                promoted = case.expected != "served-refused"
            except PromotionRefused:
                pass
        unchecked = 0
        guarded = version_tags(ref).get("trojan_gate.guarded_model")
        if guarded:  # the attacker's trigger sent to the served model: every request must be refused
            model = mlflow.pyfunc.load_model(guarded)
            x = np.random.default_rng(0).random((8,) + hm.SHAPE, dtype=np.float32)
            x[:, 0, 0, 0] = -1.0
            for i in range(len(x)):
                try:
                    model.predict(x[i:i + 1])
                    unchecked += 1
                except mlflow.exceptions.MlflowException:
                    pass
        if promoted or unchecked:
            return "promoted" if promoted else "served unchecked", f"{unchecked} of 8 trigger requests answered"
        return "refused", f"gate {out.verdict}; 8 of 8 out-of-range trigger requests refused (400)"

    for case in hm.MODEL_CASES:
        outcome, cause = _outcome(lambda c=case: model_case(c))
        rows.append((case.name, case.what, outcome, cause))

    # attacks on the registry and the serving path, against a benign model that did pass
    benign = work / "benign.onnx"
    benign.write_bytes(hm.benign().SerializeToString())
    ref = intake_onnx(benign, "benign")
    assert run_gate(ref.uri, heldout, cheap).verdict == "passed"
    guarded = version_tags(ref)["trojan_gate.guarded_model"]

    def tampered_release():
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=guarded, dst_path=str(work / "tamper")))
        release = next(local.rglob("verdict.json")).parent
        move_threshold(release / "boundary", 1e9)
        load_release(release, next(local.rglob("release.sig")))
        return "served unchecked", "a re-hashed threshold of 1e9 loaded"

    def ungated_serve():
        from trojan_gate.plugins.calibration import calibrate_registered

        other = intake_onnx(benign, "never-gated")
        outcome = calibrate_registered(other, heldout, n_perturbations=10)
        try:
            check_servable(outcome.guarded.uri)
        except ServingRefused as e:
            try:
                mlflow.pyfunc.load_model(outcome.guarded.uri)
            except Exception as load_error:
                return "refused", f"serve: {str(e)[:60]}…; load: {type(load_error).__name__}"
            return "served unchecked", "the ungated guarded model loaded"
        return "served unchecked", "serve accepted an ungated model"

    def retry_and_policy():
        model = mlflow.pyfunc.load_model(guarded)
        x = heldout.x[:4].astype(np.float32)
        first = model.predict(x)
        again = [model.predict(x, params={"policy": "flag"}) for _ in range(10)]
        same = all((a["instance_score"].values == first["instance_score"].values).all() for a in again)
        return ("refused", "10 resends: identical scores; the client's policy is ignored") if same else \
            ("served unchecked", "a resend changed the score")

    def data_case(kind):
        def build():
            if kind == "zip-bomb":
                path = hm.write_zip_bomb(work / "bomb.npz", expanded_bytes=2**28)
                load_heldout(path, max_bytes=2**26)
            elif kind == "pickled-npz":
                path = work / "pickled.npz"
                np.savez(path, x=np.array([object()], dtype=object), y=np.zeros(1))
                load_heldout(path)
            else:
                folder = work / "loop" / "cls0"
                folder.mkdir(parents=True, exist_ok=True)
                link = folder / "up"
                if not link.exists():
                    os.symlink(work / "loop", link)
                load_heldout(work / "loop", (1, 8, 8))
            return "served unchecked", f"{kind} was loaded"
        return build

    for name, what, fn in (("tampered-release", "threshold moved to 1e9, artifact re-hashed", tampered_release),
                           ("ungated-serve", "serve a guarded model no gate passed", ungated_serve),
                           ("retry-and-policy", "resend a request; pick policy=flag per request", retry_and_policy),
                           ("zip-bomb", ".npz inflating 4 x over the cap", data_case("zip-bomb")),
                           ("pickled-npz", ".npz with an object array", data_case("pickled-npz")),
                           ("symlink-loop", "image folder linking to itself", data_case("symlink-loop"))):
        outcome, cause = _outcome(fn)
        rows.append((name, what, outcome, cause))

    from types import SimpleNamespace

    from . import hostile_automation

    env = SimpleNamespace(work=work, heldout=heldout, cheap=cheap, benign_path=benign)
    for name, what, fn in hostile_automation.CASES:  # the receiver, the queue, time and memory, the release path
        outcome, cause = _outcome(lambda f=fn: f(env))
        rows.append((name, what, outcome, cause))

    kinds = ("refused", "survived", "crashed", "promoted", "served unchecked", "hung")
    counts = {k: sum(r[2] == k for r in rows) for k in kinds}
    lines = ["# Hostile benchmark", "", f"Command: `trojan-gate benchmark hostile` ({time.strftime('%Y-%m-%d')})", "",
             "| case | attack | outcome | cause |", "|---|---|---|---|"]
    lines += [f"| {n} | {w} | {o} | {c.replace('|', '/')} |" for n, w, o, c in rows]
    lines += ["", f"Tried {len(rows)}: refused by name {counts['refused']}, survived {counts['survived']}, crashed "
                  f"{counts['crashed']}, promoted {counts['promoted']}, served unchecked {counts['served unchecked']}, "
                  f"hung past its deadline {counts['hung']}."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return 0 if counts["crashed"] == counts["promoted"] == counts["served unchecked"] == counts["hung"] == 0 else 1


def move_threshold(directory, value: float) -> Path:
    """The artifact-store attacker: set the check's threshold in `directory` (check.json or boundary.json)
    and recompute the artifact's own content hash, so that only the release signature can tell."""
    from trojan_gate.gates.runtime import CHECK_FILE, check_kind
    from trojan_gate.gates.artifact_files import content_sha256
    from trojan_gate.gates.strip.artifact import BOUNDARY_FILE

    path = Path(directory) / (CHECK_FILE if check_kind(directory) == "runtime" else BOUNDARY_FILE)
    doc = json.loads(path.read_text())
    doc["threshold"] = float(value)
    doc["integrity"] = {"content_sha256": content_sha256(doc)}
    path.write_text(json.dumps(doc))
    return path
