"""Streaming inputs and results of `trojan-gate check` (`array_stream`): chunks, scaling, forged headers."""
import zipfile

import numpy as np
import pytest

from trojan_gate.pipelines.array_stream import InputStream, ResultWriter


def _read(path, size=3):
    with InputStream(path) as s:
        return np.concatenate(list(s.chunks(size)))


def test_npz_npy_and_single_key_read_in_chunks(tmp_path):
    x = np.random.default_rng(0).random((10, 1, 4, 4), dtype=np.float32)
    np.savez(tmp_path / "a.npz", x=x, y=np.arange(10))
    np.savez_compressed(tmp_path / "b.npz", images=x)
    np.save(tmp_path / "c.npy", x)
    for name in ("a.npz", "b.npz", "c.npy"):
        np.testing.assert_array_equal(_read(tmp_path / name), x)
    with InputStream(tmp_path / "a.npz") as s:
        assert len(s) == 10 and [len(c) for c in s.chunks(4)] == [4, 4, 2]


def test_uint8_is_scaled_and_a_channel_is_added(tmp_path):
    x = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
    np.savez(tmp_path / "u.npz", x=x)
    got = _read(tmp_path / "u.npz")
    assert got.shape == (2, 1, 3, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got[:, 0], x / 255.0, rtol=1e-6)


@pytest.mark.parametrize("array, message", [
    (np.array(["a", "b"]), "dtype"),
    (np.zeros((2, 3), np.float32), "shape"),
    (np.asfortranarray(np.zeros((2, 1, 3, 3), np.float32)), "Fortran"),
])
def test_arrays_that_are_not_images_are_refused_by_name(tmp_path, array, message):
    np.savez(tmp_path / "bad.npz", x=array)
    with pytest.raises(ValueError, match=message):
        InputStream(tmp_path / "bad.npz")


def test_ambiguous_keys_and_missing_files_are_refused(tmp_path):
    np.savez(tmp_path / "two.npz", a=np.zeros((1, 2, 2)), b=np.zeros((1, 2, 2)))
    with pytest.raises(KeyError, match="put the images under 'x'"):
        InputStream(tmp_path / "two.npz")
    with pytest.raises(FileNotFoundError):
        InputStream(tmp_path / "none.npz")


def test_a_forged_row_count_is_refused_before_anything_is_allocated(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((4, 1, 2, 2), np.float32))
    header = (tmp_path / "x.npy").read_bytes()
    forged = header.replace(b"'shape': (4,", b"'shape': (5,")  # one row more than the 4 stored
    assert forged != header
    (tmp_path / "f.npy").write_bytes(forged)
    with pytest.raises(ValueError, match="more than the file holds"):
        InputStream(tmp_path / "f.npy")
    with zipfile.ZipFile(tmp_path / "f.npz", "w", compression=zipfile.ZIP_DEFLATED) as z:  # same in a zip member
        z.writestr("x.npy", forged)
    with pytest.raises(ValueError, match="more than the file holds"):
        InputStream(tmp_path / "f.npz")


def test_result_writer_writes_only_when_complete(tmp_path):
    w = ResultWriter(tmp_path / "out" / "r.npz", 5, {"score": np.float64, "flag": np.bool_})
    w.write(0, {"score": [1.0, 2.0], "flag": [True, False]})
    w.write(2, {"score": [3.0, 4.0, 5.0], "flag": [False, False, True]})
    assert w.totals("score") == (15.0, 5)
    w.close()
    r = np.load(tmp_path / "out" / "r.npz")
    np.testing.assert_array_equal(r["score"], [1, 2, 3, 4, 5]) and r["flag"].dtype == bool
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["r.npz"]
    w2 = ResultWriter(tmp_path / "gone.npz", 3, {"score": np.float64})
    w2.discard()
    assert not (tmp_path / "gone.npz").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
