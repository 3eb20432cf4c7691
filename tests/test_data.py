"""Fashion-MNIST IDX loading: the real files, and clear errors for missing or corrupt ones."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from masksub import data


def _write_idx(path, array: np.ndarray, compress: bool):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    (gzip.open if compress else open)(path, "wb").write(payload)


@pytest.fixture
def fake_dir(tmp_path):
    rng = np.random.default_rng(0)
    for split, (img, lab) in data.FILES.items():
        n = 12 if split == "train" else 6
        _write_idx(tmp_path / (img + ".gz"), rng.integers(0, 256, (n, 28, 28)), compress=True)
        _write_idx(tmp_path / lab, rng.integers(0, 10, (n,)), compress=False)
    return tmp_path


def test_reads_idx_files_gz_or_not(fake_dir):
    x, y = data.load_fashion_mnist("train", fake_dir)
    assert x.shape == (12, 28, 28) and x.dtype == torch.uint8
    assert y.shape == (12,) and y.dtype == torch.int64


def test_torchvision_root_and_home_relative_folders_are_found(fake_dir, tmp_path, monkeypatch):
    root = tmp_path / "home" / "data"
    (root / "FashionMNIST" / "raw").mkdir(parents=True)  # where torchvision.datasets.FashionMNIST(root) downloads
    for f in fake_dir.glob("*-ubyte*"):
        f.rename(root / "FashionMNIST" / "raw" / f.name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for given in (root, "~/data", root / "FashionMNIST" / "raw"):
        assert data.find_fashion_mnist(given) == root / "FashionMNIST" / "raw"
    assert data.load_fashion_mnist("train", "~/data")[0].shape == (12, 28, 28)


def test_real_fashion_mnist_when_installed():
    try:
        folder = data.find_fashion_mnist()
    except FileNotFoundError:
        pytest.skip("dataset-fashion-mnist not installed")
    x, y = data.load_fashion_mnist("test", folder)
    assert x.shape == (10000, 28, 28) and y.shape == (10000,)
    assert torch.bincount(y).tolist() == [1000] * 10
    assert abs(x[:1000].float().mean().item() / 255 - data.MEAN) < 0.02


def test_missing_data_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "SYSTEM_DIR", tmp_path / "nowhere")
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.load_fashion_mnist("train", tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "magic", "gzip", "deflate"])
def test_corrupt_file_named(fake_dir, damage):
    path = fake_dir / "t10k-labels-idx1-ubyte"
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[:-2])
    elif damage == "magic":
        path.write_bytes(b"\x12\x34" + raw[2:])
    elif damage == "deflate":  # a flipped byte inside the compressed stream: was zlib's bare error
        path = fake_dir / "t10k-images-idx3-ubyte.gz"
        _write_idx(path, np.arange(6 * 28 * 28).reshape(6, 28, 28) % 7, compress=True)  # compressible: deflated
        packed = bytearray(path.read_bytes())
        packed[packed.index(0, 10) + 3] ^= 0xFF  # past the header and the file name it holds
        path.write_bytes(bytes(packed))
        with pytest.raises(data.CorruptDataError, match="t10k-images-idx3-ubyte.gz: Error -3 while decompressing"):
            data.load_fashion_mnist("test", fake_dir)
        return
    else:
        path.unlink()
        (fake_dir / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(data.CorruptDataError, match="t10k-labels-idx1-ubyte"):
        data.load_fashion_mnist("test", fake_dir)


def test_trainer_reports_a_corrupt_file_and_writes_nothing(fake_dir, tmp_path, capsys):
    from masksub.cli import main

    path = fake_dir / "train-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes()[:-3])
    out = tmp_path / "runs"
    assert main(["train", "--data.dir", str(fake_dir), "--train.output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "masksub train: error:" in err and "train-labels-idx1-ubyte" in err and "truncated or corrupt" in err
    assert not out.exists()
