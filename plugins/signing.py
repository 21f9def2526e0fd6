"""Signed releases: what the gate approved, signed with OpenSSF's `model-signing` (key-based, offline).

A *release* is the folder a guarded model serves from:

    release/model.onnx               the ONNX the gate scanned (sha256 = the intake tag)
    release/boundary/                the STRIP artifact (boundary.json + bank.npy)
    release/verdict.json             verdict, model and artifact sha256, fingerprint, resolved config

`sign_release` signs the whole folder (every file's sha256 in an in-toto statement, a DSSE
envelope signed with an elliptic-curve private key) into a signature file kept beside it.
`verify_release` checks the signature with the public key and refuses (ArtifactIntegrityError)
on any changed, added or missing file: a boundary moved to -1e9 and re-hashed no longer loads.

Keys are PEM files named by the environment (or the CLI flags that set it):
`TROJAN_GATE_SIGNING_KEY` (private, where the gate runs) and `TROJAN_GATE_VERIFY_KEY` (public,
where models are promoted or served). `trojan-gate keygen` writes a pair.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from trojan_gate.gates.errors import ArtifactIntegrityError, TrojanGateError

SIGNING_KEY_ENV = "TROJAN_GATE_SIGNING_KEY"
VERIFY_KEY_ENV = "TROJAN_GATE_VERIFY_KEY"
VERDICT_FILE = "verdict.json"
SERVABLE = ("passed", "patched")


class SigningError(TrojanGateError):
    """No usable signing or verification key."""


def keypair_paths(directory) -> tuple[Path, Path]:
    """Where a key pair lives in `directory`: (`signing-key.pem`, `verify-key.pem`)."""
    directory = Path(directory)
    return directory / "signing-key.pem", directory / "verify-key.pem"


def generate_keypair(directory) -> tuple[Path, Path]:
    """An EC P-256 key pair as PEM files `signing-key.pem` (private, mode 600) and `verify-key.pem`."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    Path(directory).mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    private, public = keypair_paths(directory)
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def _key(env: str, what: str, path=None) -> Path:
    path = path or os.environ.get(env)
    if not path:
        raise SigningError(f"no {what} key: set {env} to a PEM file (`trojan-gate keygen --out DIR` makes a pair)")
    path = Path(path)
    if not path.is_file():
        raise SigningError(f"{what} key {path} ({env}) is not a file")
    return path


def signing_key(path=None) -> Path:
    return _key(SIGNING_KEY_ENV, "signing", path)


def verify_key(path=None) -> Path:
    return _key(VERIFY_KEY_ENV, "verification", path)


def key_id(path) -> str:
    """sha256 of the public key's DER bytes, from a public or a private PEM file: which key signed."""
    import hashlib

    from cryptography.hazmat.primitives import serialization

    data = Path(path).read_bytes()
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        key = serialization.load_pem_private_key(data, password=None).public_key()
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def write_release(directory, onnx_path, boundary_dir, verdict: dict) -> Path:
    """Lay out a release folder (see the module doc) from the verified ONNX, the artifact and the verdict."""
    import shutil

    directory = Path(directory)
    if directory.exists():
        shutil.rmtree(directory)
    (directory / "boundary").mkdir(parents=True)
    shutil.copyfile(onnx_path, directory / "model.onnx")
    for f in Path(boundary_dir).iterdir():
        shutil.copyfile(f, directory / "boundary" / f.name)
    (directory / VERDICT_FILE).write_text(json.dumps(verdict, indent=2, sort_keys=True, default=str))
    return directory


def sign_release(directory, signature_path, private_key=None) -> Path:
    import model_signing

    model_signing.signing.Config().use_elliptic_key_signer(private_key=str(signing_key(private_key))).sign(
        str(directory), str(signature_path))
    return Path(signature_path)


def verify_release(directory, signature_path, public_key=None) -> dict:
    """Check the release's signature; return its verdict document. Refuses on any mismatch."""
    import model_signing

    key = verify_key(public_key)
    if not Path(signature_path).is_file():
        raise ArtifactIntegrityError(f"release {directory} has no signature file {signature_path}")
    try:
        model_signing.verifying.Config().use_elliptic_key_verifier(public_key=str(key)).verify(
            str(directory), str(signature_path))
    except Exception as e:  # model_signing raises ValueError on a mismatch, others on a bad bundle
        raise ArtifactIntegrityError(f"release signature does not verify with {key}: {e}") from e
    return json.loads((Path(directory) / VERDICT_FILE).read_text())
