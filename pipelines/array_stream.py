"""Streaming arrays for `trojan-gate check`: inputs read and results written a chunk at a time.

`InputStream` reads the rows of one array of an .npz (key 'x', or its only array) or of an .npy
file without loading it: the NPY header gives dtype and shape, and rows are read from the file
(or the zip member, decompressed as it goes) `size` at a time. The header is checked against what
the file can hold (a member's declared size, the file's size), so a forged shape is refused by
name before anything is allocated. uint8 images are scaled to [0, 1]; (n, H, W) gets a channel.

`ResultWriter` keeps each per-input result in a memory-mapped .npy in a temporary folder beside
the output and writes the .npz (compressed) at the end, renamed into place only when complete: a
check that fails midway leaves no output file.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np

INPUT_KEY = "x"


class InputStream:
    """Rows of an image array in an .npz / .npy, `chunks(size)` at a time (see the module doc)."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"inputs not found: {self.path}")
        self._zip = None
        if zipfile.is_zipfile(self.path):
            self._zip = zipfile.ZipFile(self.path)
            names = [n[:-4] for n in self._zip.namelist() if n.endswith(".npy")]
            if INPUT_KEY in names:
                key = INPUT_KEY
            elif len(names) == 1:
                key = names[0]
            else:
                raise KeyError(f"{self.path} has keys {names}; put the images under '{INPUT_KEY}'")
            info = self._zip.getinfo(key + ".npy")
            self._file, size = self._zip.open(info), info.file_size
        else:
            self._file, size = open(self.path, "rb"), self.path.stat().st_size
        try:
            version = np.lib.format.read_magic(self._file)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                raise ValueError(f"NPY format version {version} is not read here; save the inputs with numpy.savez")
            shape, fortran, dtype = read_header(self._file)
            size -= self._file.tell()  # the bytes left for the rows
        except ValueError as e:
            self.close()
            raise ValueError(f"{self.path}: not a readable NPY array: {e}") from e
        self.dtype, self.shape = np.dtype(dtype), tuple(int(d) for d in shape)
        problem = None
        if self.dtype.hasobject or not (self.dtype == np.uint8 or np.issubdtype(self.dtype, np.floating)):
            problem = f"images must be float in [0, 1] or uint8, got dtype {self.dtype}"
        elif len(self.shape) not in (3, 4):
            problem = f"images must be (n, C, H, W) or (n, H, W), got shape {self.shape}"
        elif fortran and len(self.shape) > 1:
            problem = "images are stored in Fortran order; save a C-ordered array"
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize if not problem else 0
        if not problem and self.shape[0] * self.row_bytes > size:
            problem = f"the header declares {self.shape[0]} rows, more than the file holds"
        if problem:
            self.close()
            raise ValueError(f"{self.path}: {problem}")

    def __len__(self) -> int:
        return self.shape[0]

    def chunks(self, size: int):
        """Yield float32 arrays (m, C, H, W) of up to `size` rows, in file order."""
        rows_per_read = max(1, int(size))
        for start in range(0, len(self), rows_per_read):
            m = min(rows_per_read, len(self) - start)
            raw = self._file.read(m * self.row_bytes)
            if len(raw) != m * self.row_bytes:
                raise ValueError(f"{self.path}: the array ends after {start + len(raw) // max(1, self.row_bytes)} "
                                 f"of {len(self)} rows")
            x = np.frombuffer(raw, dtype=self.dtype).reshape((m,) + self.shape[1:])
            x = x.astype(np.float32) / 255.0 if self.dtype == np.uint8 else x.astype(np.float32, copy=False)
            yield x[:, None] if x.ndim == 3 else x

    def close(self):
        for f in (getattr(self, "_file", None), self._zip):
            if f is not None:
                f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ResultWriter:
    """Per-input results of n inputs, filled by chunks, written as one .npz at `close()` (see the module doc)."""

    def __init__(self, path, n: int, columns: dict):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._dir = tempfile.mkdtemp(prefix=".check-", dir=self.path.parent)
        self.columns = {name: np.lib.format.open_memmap(os.path.join(self._dir, name + ".npy"), mode="w+",
                                                        dtype=dtype, shape=(int(n),))
                        for name, dtype in columns.items()}

    def write(self, start: int, values: dict):
        """Store the results of rows start .. start + len - 1."""
        for name, column in self.columns.items():
            v = np.asarray(values[name])
            column[start:start + len(v)] = v

    def totals(self, name: str) -> tuple:
        """(sum, count) of a column, read from the map."""
        column = self.columns[name]
        return float(column.sum(dtype=np.float64)), len(column)

    def close(self):
        """Write the .npz next to the output and rename it into place."""
        tmp = os.path.join(self._dir, "out.npz")
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **self.columns)
        os.replace(tmp, self.path)
        self.discard()

    def discard(self):
        """Remove the temporary folder (after close, or when the check failed)."""
        self.columns = {}
        shutil.rmtree(self._dir, ignore_errors=True)
