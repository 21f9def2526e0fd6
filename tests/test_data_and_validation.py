"""Data loaders and the great-expectations checks every held-out set passes before use."""
import numpy as np
import pytest

from trojan_gate.gates.data import DEBIAN_FASHION_MNIST, load_fashion_mnist, load_heldout
from trojan_gate.gates.errors import DataValidationError
from trojan_gate.gates.validation import validate_heldout


def test_digits_loader_gives_float32_nchw_in_unit_range(digits):
    train, test = digits
    assert train.x.dtype == np.float32 and train.x.shape[1:] == (1, 8, 8)
    assert train.y.dtype == np.int64
    assert 0.0 <= train.x.min() and train.x.max() <= 1.0
    assert set(np.unique(test.y)) == set(range(10))


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_loads_offline_through_torchvision(tmp_path, monkeypatch):
    monkeypatch.setenv("TROJAN_GATE_CACHE", str(tmp_path))
    ds = load_fashion_mnist(train=False, limit=500)
    assert ds.x.shape == (500, 1, 28, 28) and ds.x.dtype == np.float32
    assert ds.y.dtype == np.int64 and ds.y.max() <= 9
    assert (tmp_path / "torchvision" / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte").is_file()


def test_heldout_npz_and_uint8_scaling(tmp_path):
    x = (np.arange(4 * 8 * 8) % 256).astype(np.uint8).reshape(4, 8, 8)
    np.savez(tmp_path / "h.npz", x=x, y=np.array([0, 1, 2, 3]))
    ds = load_heldout(tmp_path / "h.npz")
    assert ds.x.shape == (4, 1, 8, 8) and ds.x.dtype == np.float32 and ds.x.max() <= 1.0


def test_heldout_npz_missing_key_is_named(tmp_path):
    np.savez(tmp_path / "h.npz", images=np.zeros((2, 1, 8, 8)))
    with pytest.raises(KeyError, match="'x'"):
        load_heldout(tmp_path / "h.npz")


def test_heldout_image_folder(tmp_path):
    from PIL import Image

    for cls in ("0", "1"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((10, 10, 3), 40 * i + 100 * int(cls), np.uint8)).save(tmp_path / "imgs" / cls / f"{i}.png")
    ds = load_heldout(tmp_path / "imgs", input_shape=(1, 8, 8))
    assert ds.x.shape == (6, 1, 8, 8) and sorted(set(ds.y.tolist())) == [0, 1]


def test_valid_heldout_passes(digits):
    _, test = digits
    rep = validate_heldout(test.x, test.y, (1, 8, 8), 10)
    assert rep.success and rep.failures == [] and len(rep.checks) == 7


@pytest.mark.parametrize("corrupt, expected", [
    (lambda x, y: (x[:, :, :4, :4], y), "image shape"),
    (lambda x, y: (np.where(np.arange(x.size).reshape(x.shape) == 5, np.nan, x).astype(np.float32), y), "finite"),
    (lambda x, y: (x * 3.0, y), "pixel values <= 1.0"),
    (lambda x, y: (x - 1.0, y), "pixel values >= 0.0"),
    (lambda x, y: (x, np.where(y == 9, 12, y)), "labels are integer classes"),
    (lambda x, y: (x[y != 4], y[y != 4]), "every one of the 10 classes"),
])
def test_each_broken_expectation_is_reported(digits, corrupt, expected):
    _, test = digits
    x, y = corrupt(test.x.copy(), test.y.copy())
    with pytest.raises(DataValidationError) as err:
        validate_heldout(x, y, (1, 8, 8), 10)
    assert any(expected in f for f in err.value.failures), err.value.failures


def test_minimum_count_per_class_and_all_failures_listed(digits):
    _, test = digits
    keep = np.concatenate([np.flatnonzero(test.y != 7), np.flatnonzero(test.y == 7)[:2]])
    x = test.x[keep] * 2.0
    with pytest.raises(DataValidationError) as err:
        validate_heldout(x, test.y[keep], (1, 8, 8), 10, min_per_class=5)
    msg = str(err.value)
    assert "at least 5 images" in msg and "[7]" in msg and "pixel values <= 1.0" in msg
    assert len(err.value.failures) == 2


def test_concurrent_first_loads_unpack_the_debian_files_without_racing(tmp_path):
    """Several processes (serving workers, parallel jobs) may unpack the IDX files into an empty
    cache at once; each writes its own temporary file, so none fails and every file is whole."""
    import gzip
    import threading

    from trojan_gate.gates.data import _FMNIST_FILES, _prepare_debian_root

    source = tmp_path / "debian"
    source.mkdir()
    payload = {f: np.random.default_rng(i).bytes(2_000_000) for i, f in enumerate(_FMNIST_FILES)}
    for f, data in payload.items():
        with gzip.open(source / f"{f}.gz", "wb", compresslevel=1) as out:
            out.write(data)
    root, barrier, errors = tmp_path / "cache", threading.Barrier(6), []

    def unpack():
        barrier.wait()
        try:
            assert _prepare_debian_root(source, root)
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=unpack) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    raw = root / "FashionMNIST" / "raw"
    assert {f: (raw / f).read_bytes() for f in _FMNIST_FILES} == payload
    assert sorted(p.name for p in raw.iterdir()) == sorted(_FMNIST_FILES)
