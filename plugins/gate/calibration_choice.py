"""Which scan calibration a gate uses, decided before the gate starts (it enters the reuse fingerprint).

`[scan] calibration` in the settings:

- ``auto`` (default): the newest registered calibration whose task key matches the version's
  input shape and number of classes (its intake tags) and the held-out set's sha256; none
  found -> the paper's test decides, and the report says why;
- ``none``: the paper's test decides;
- a directory or ``models:/NAME/VERSION``: that calibration; a model or held-out set of
  another task is then refused by name (the gate ends in `error`), never silently ignored.

With `[scan] decision = "paper"` no calibration is looked up. The choice is only *named* here
(source, sha256, reason); `load` reads and verifies it inside the gate run, so a tampered or
missing calibration fails the gate closed.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trojan_gate.gates.data import Dataset, load_heldout
from trojan_gate.gates.metascan import calibration_sha256, load_calibration
from trojan_gate.gates.metascan.shadows import heldout_sha256

from ..registry import is_model_uri, resolve, tag


@dataclass(frozen=True)
class CalibrationChoice:
    source: str | None  # a directory, a models:/ URI, or None (the paper's test decides)
    sha256: str | None
    reason: str
    explicit: bool = False


def _heldout_dataset(heldout, input_shape) -> Dataset:
    return heldout if isinstance(heldout, Dataset) else load_heldout(heldout, input_shape)


def heldout_digest(heldout, model_tags: dict) -> str:
    """The held-out data's sha256 for the reuse fingerprint; data that cannot be read gets a digest
    of its error (no recorded verdict has one, and the gate refuses the data by name later)."""
    try:
        shape = tuple(int(v) for v in model_tags.get(tag("input_shape"), "").split("x") if v)
        return heldout_sha256(_heldout_dataset(heldout, shape or None))
    except Exception as e:
        return "unreadable:" + type(e).__name__


def choose_calibration(settings, model_tags: dict, heldout, client) -> CalibrationChoice:
    """Name the calibration this gate will use (see the module doc); never raises for `auto`."""
    from ..scan_calibration import find_registered, task_key

    wanted = settings.calibration
    if settings.decision == "paper":
        return CalibrationChoice(None, None, "the settings ask for the paper's test ([scan] decision = \"paper\")")
    if wanted == "none":
        return CalibrationChoice(None, None, "scan calibration turned off ([scan] calibration = \"none\")")
    if wanted != "auto":
        if is_model_uri(wanted):
            ref = resolve(wanted, client=client)
            sha = (client.get_model_version(ref.name, ref.version).tags or {}).get(tag("calibration.sha256"))
            return CalibrationChoice(ref.uri, sha, f"the calibration named in the settings ({ref.uri})", True)
        try:
            sha = calibration_sha256(wanted)
        except Exception:
            sha = None  # load() refuses it by name inside the gate run
        return CalibrationChoice(str(Path(wanted)), sha, f"the calibration named in the settings ({wanted})", True)
    try:
        shape = tuple(int(v) for v in model_tags.get(tag("input_shape"), "").split("x") if v)
        n_classes = int(model_tags.get(tag("n_classes"), "0"))
        data_sha = heldout_sha256(_heldout_dataset(heldout, shape or None))
        key = task_key(shape, n_classes, data_sha)
    except Exception as e:  # the held-out data is validated (and refused by name) inside the gate run
        return CalibrationChoice(None, None, f"no task key: the held-out data or the version's intake tags could "
                                             f"not be read ({type(e).__name__}: {e})")
    try:
        found = find_registered(key, client=client)
    except Exception as e:  # the paper's test still gates; the report says why the calibration was not used
        return CalibrationChoice(None, None, f"the registry could not be searched for a scan calibration of this "
                                             f"task ({type(e).__name__}: {e})")
    if found is None:
        return CalibrationChoice(None, None, f"no registered scan calibration matches this task (input "
                                             f"{'x'.join(map(str, shape))}, {n_classes} classes, held-out sha256 "
                                             f"{data_sha[:16]}; task key {key[:16]}): run `trojan-gate calibrate-scan "
                                             f"--heldout H --out DIR --register NAME` with the same held-out data")
    sha = (client.get_model_version(found.name, found.version).tags or {}).get(tag("calibration.sha256"))
    return CalibrationChoice(found.uri, sha, f"the registered calibration {found.uri} matches this task")


def load(choice: CalibrationChoice, client):
    """Read and verify the chosen calibration (ArtifactIntegrityError / RegistryError by name)."""
    from ..scan_calibration import load_registered

    if choice.source is None:
        return None
    if is_model_uri(choice.source):
        return load_registered(choice.source, client=client)
    cal = load_calibration(choice.source, expected_sha256=choice.sha256)
    cal.registry_uri_ = ""
    return cal
