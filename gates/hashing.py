"""sha256 of files and arrays, used to pin models and artifacts."""
import hashlib
from pathlib import Path

import numpy as np


def sha256_file(path, chunk=1 << 20) -> str:
    """sha256 of the file's bytes, hex (read in blocks of `chunk` bytes)."""
    h = hashlib.sha256()
    with open(Path(path), "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """sha256 of the bytes, hex."""
    return hashlib.sha256(data).hexdigest()


def sha256_array(a: np.ndarray) -> str:
    """sha256 of str(dtype) + str(shape) + the C-contiguous bytes of `a`, hex."""
    a = np.ascontiguousarray(a)
    h = hashlib.sha256()
    h.update(str(a.dtype).encode())
    h.update(str(a.shape).encode())
    h.update(a.tobytes())
    return h.hexdigest()
