"""Tests for data/: CIFAR reading (fake files in torchvision's layout), digits, augmentation,
the training loader.

Everything runs on the CPU without network; a CUDA-only check is skipped when no GPU is present.
"""
from __future__ import annotations

import functools
import http.server
import os
import pickle
import sys
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
from data import cifar
from data.augment import crop_flip, crop_flip_params, random_crop_flip
from data.digits import DIGITS_TEST_SIZE, DIGITS_VAL_SIZE, split_indices
from errors import DataError

# Imported by path, not as tests.fake_cifar: robustbench's wheel installs a top-level `tests`
# package into site-packages that would shadow this folder.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fake_cifar import write_fake_cifar  # noqa: E402

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# ---------------------------------------------------------------------------------------------
# CIFAR on fake files


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_fake_cifar_load_splits_matches_written(tmp_path, name):
    written = write_fake_cifar(str(tmp_path), name, n_train=37, n_test=13, seed=1)
    s = data.load_splits(name, root=str(tmp_path), val_size=5, download=False)
    assert (s.name, s.num_classes) == (name, data.NUM_CLASSES[name])
    for t, shape in ((s.train_x, (32, 3, 32, 32)), (s.val_x, (5, 3, 32, 32)),
                     (s.test_x, (13, 3, 32, 32))):
        assert t.dtype == torch.uint8 and t.shape == shape
    assert s.train_y.dtype == s.val_y.dtype == s.test_y.dtype == torch.int64
    # val = the FIRST val_size training images (in file order), train = the rest
    tx, ty = torch.from_numpy(written["train_x"]), torch.from_numpy(written["train_y"])
    assert torch.equal(s.val_x, tx[:5]) and torch.equal(s.val_y, ty[:5])
    assert torch.equal(s.train_x, tx[5:]) and torch.equal(s.train_y, ty[5:])
    assert torch.equal(s.test_x, torch.from_numpy(written["test_x"]))
    assert torch.equal(s.test_y, torch.from_numpy(written["test_y"]))
    s0 = data.load_splits(name, root=str(tmp_path), val_size=0, download=False)
    assert s0.val_x.shape == (0, 3, 32, 32) and s0.val_y.shape == (0,) and len(s0.train_x) == 37


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_fake_cifar_agrees_with_torchvision_reader(tmp_path, monkeypatch, name):
    """torchvision reads our fake files too (so the format is right), with the same pixels/labels;
    its HWC arrays equal our CHW tensors permuted, which pins down the orientation."""
    import torchvision.datasets.cifar as tvc

    write_fake_cifar(str(tmp_path), name, n_train=12, n_test=6)
    monkeypatch.setattr(tvc, "check_integrity", lambda *a, **k: True)  # md5s are of real files
    cls = tvc.CIFAR10 if name == "cifar10" else tvc.CIFAR100
    for split, train in (("train", True), ("test", False)):
        tv = cls(str(tmp_path), train=train, download=False)
        x, y = data.load_dataset(name, split, root=str(tmp_path), download=False)
        assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
        assert torch.equal(torch.from_numpy(tv.data), (x * 255).round().byte().permute(0, 2, 3, 1))
        assert y.tolist() == tv.targets and y.dtype == torch.int64
    assert len(tv.classes) == data.NUM_CLASSES[name]


def test_fake_cifar_orientation_known_pattern(tmp_path):
    """A hand-made row: channel c, pixel (i, j) sits at c*1024 + i*32 + j in the 3072-byte row."""
    write_fake_cifar(str(tmp_path), "cifar10", n_train=5, n_test=1)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    entry = pickle.loads(path.read_bytes(), encoding="latin1")
    row = np.zeros(3072, np.uint8)
    row[0 * 1024 + 0 * 32 + 1] = 10  # R, top row, second column
    row[1 * 1024 + 2 * 32 + 0] = 20  # G, third row, first column
    row[2 * 1024 + 31 * 32 + 31] = 30  # B, bottom-right
    entry["data"] = row[None]
    path.write_bytes(pickle.dumps(entry, protocol=2))  # a Python-3 writer: str keys also work
    x, _ = data.load_dataset("cifar10", "test", root=str(tmp_path), download=False)
    img = (x[0] * 255).round()
    assert img.sum() == 60
    assert (img[0, 0, 1], img[1, 2, 0], img[2, 31, 31]) == (10, 20, 30)


def test_load_dataset_n_examples_and_errors(tmp_path):
    write_fake_cifar(str(tmp_path), "cifar10", n_train=10, n_test=8)
    x, y = data.load_dataset("cifar10", "test", root=str(tmp_path), n_examples=3, download=False)
    x_all, y_all = data.load_dataset("cifar10", "test", root=str(tmp_path), download=False)
    assert torch.equal(x, x_all[:3]) and torch.equal(y, y_all[:3])
    with pytest.raises(ValueError, match=r"n_examples"):
        data.load_dataset("cifar10", "test", root=str(tmp_path), n_examples=9, download=False)
    with pytest.raises(ValueError, match=r"did you mean 'cifar10'.*valid names: cifar10, cifar100"):
        data.load_dataset("cifar-10")
    with pytest.raises(ValueError, match=r"valid splits: train, test"):
        data.load_dataset("cifar10", "val", root=str(tmp_path))
    with pytest.raises(ValueError, match=r"0 <= val_size < 10"):
        data.load_splits("cifar10", root=str(tmp_path), val_size=10, download=False)
    with pytest.raises(ValueError, match=r"val_size"):
        data.load_splits("cifar10", root=str(tmp_path), val_size=-1, download=False)


@pytest.mark.parametrize("name,folder,archive", [
    ("cifar10", "cifar-10-batches-py", "cifar-10-python"),
    ("cifar100", "cifar-100-python", "cifar-100-python")])
def test_missing_cifar_without_download_names_path_and_url(tmp_path, monkeypatch, name, folder,
                                                           archive):
    monkeypatch.setattr(cifar, "_download", lambda *a: pytest.fail("must not download"))
    with pytest.raises(FileNotFoundError) as info:
        data.load_splits(name, root=str(tmp_path / "nowhere"), download=False)
    msg = str(info.value)
    assert os.path.join(str(tmp_path), "nowhere", folder) in msg and "\n" not in msg
    assert f"https://www.cs.toronto.edu/~kriz/{archive}.tar.gz" in msg and "extract it under" in msg


def test_failed_download_gives_clear_chained_error(tmp_path, monkeypatch):
    def offline(spec, root):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(cifar, "_download", offline)
    with pytest.raises(FileNotFoundError) as info:
        data.load_dataset("cifar10", "test", root=str(tmp_path))
    msg = str(info.value)
    assert str(tmp_path / "cifar-10-batches-py") in msg and "download failed" in msg
    assert "cifar-10-python.tar.gz" in msg and "\n" not in msg
    assert isinstance(info.value.__cause__, OSError)


@pytest.fixture()
def broken_mirror(tmp_path, monkeypatch):
    """torchvision's own download of CIFAR-10, from a local server that sends a damaged
    archive (what a dropped connection leaves): the real download code fails on the checksum
    after writing the archive into data.root."""
    import torchvision.datasets as tvd

    served = tmp_path / "served"
    served.mkdir()
    (served / tvd.CIFAR10.filename).write_bytes(b"\x1f\x8b" + bytes(5000))

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(tvd.CIFAR10, "url",
                        f"http://127.0.0.1:{server.server_port}/{tvd.CIFAR10.filename}")
    yield
    server.shutdown()
    server.server_close()
    thread.join()


def test_failed_download_removes_only_what_it_created(tmp_path, broken_mirror):
    # A data.root that did not exist: the whole tree the attempt made goes.
    root = tmp_path / "new" / "data"
    with pytest.raises(FileNotFoundError, match="download failed") as info:
        data.load_dataset("cifar10", "test", root=str(root))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "new").exists()
    # An existing data.root keeps everything it held; only the damaged archive goes.
    root = tmp_path / "data"
    root.mkdir()
    (root / "mnist.txt").write_text("keep me")
    with pytest.raises(FileNotFoundError, match="download failed"):
        data.load_dataset("cifar10", "test", root=str(root))
    assert sorted(p.name for p in root.iterdir()) == ["mnist.txt"]
    assert (root / "mnist.txt").read_text() == "keep me"


def test_download_path_loads_what_was_fetched(tmp_path, monkeypatch):
    fetched = []
    monkeypatch.setattr(cifar, "_download", lambda spec, root: fetched.append(
        write_fake_cifar(root, "cifar100", n_train=4, n_test=3)))
    x, y = data.load_dataset("cifar100", "test", root=str(tmp_path))
    assert len(fetched) == 1 and x.shape == (3, 3, 32, 32)
    assert torch.equal(y, torch.from_numpy(fetched[0]["test_y"]))


def test_corrupt_cifar_file_names_the_file(tmp_path):
    write_fake_cifar(str(tmp_path), "cifar10", n_train=10, n_test=4)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[:100])  # truncated mid-pickle
    with pytest.raises(DataError) as info:
        data.load_splits("cifar10", root=str(tmp_path), val_size=2, download=False)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# digits


def test_digits_splits():
    s = data.load_splits("digits")  # default val_size for digits is DIGITS_VAL_SIZE
    assert s.num_classes == 10 and len(s.val_x) == DIGITS_VAL_SIZE == 200
    assert len(s.train_x) + len(s.val_x) == 1437 and len(s.test_x) == DIGITS_TEST_SIZE == 360
    for x, y in ((s.train_x, s.train_y), (s.val_x, s.val_y), (s.test_x, s.test_y)):
        assert x.dtype == torch.uint8 and x.shape[1:] == (3, 32, 32) and y.dtype == torch.int64
        assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])  # grey
        assert set(y.tolist()) == set(range(10))
    train_idx, test_idx = split_indices()  # into scikit-learn's order
    assert len(set(train_idx.tolist()) | set(test_idx.tolist())) == 1797  # disjoint, complete
    # deterministic across calls whatever the global seeds, and load_dataset agrees with load_splits
    torch.manual_seed(123)
    np.random.seed(123)
    s2 = data.load_splits("digits", val_size=50)
    assert torch.equal(s2.test_x, s.test_x) and torch.equal(s2.val_x, s.val_x[:50])
    xt, yt = data.load_dataset("digits", "train")
    assert xt.shape == (1437, 3, 32, 32) and xt.dtype == torch.float32
    assert 0 <= xt.min() and xt.max() == 1
    assert torch.equal(xt, data.to_float(torch.cat([s.val_x, s.train_x])))
    xv, yv = data.load_dataset("digits", "val")
    assert torch.equal(yv, s.val_y) and torch.equal(xv, data.to_float(s.val_x))
    xs, ys = data.load_dataset("digits", "test", n_examples=7)
    assert torch.equal(ys, s.test_y[:7])
    with pytest.raises(ValueError, match=r"0 <= val_size < 1437"):
        data.load_splits("digits", val_size=1437)


def test_digits_read_from_the_bundled_csv_equal_scikit_learns_loader(monkeypatch):
    from data import digits

    direct = digits._sklearn_digits()
    assert digits._bundled_csv() is not None  # the fast path is the one taken here
    digits._sklearn_digits.cache_clear()
    monkeypatch.setattr(digits, "_bundled_csv", lambda: None)  # a layout without the CSV
    try:
        through_api = digits._sklearn_digits()
    finally:
        digits._sklearn_digits.cache_clear()
    for a, b in zip(direct, through_api):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


def test_digits_conversion_matches_recipe():
    """uint8 = round(255 * clamp(bilinear_8->32(pixels / 16))), grey replicated to 3 channels."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    up = F.interpolate(torch.tensor(raw.images, dtype=torch.float32)[:, None] / 16, size=32,
                       mode="bilinear", align_corners=False).clamp(0, 1).mul(255).round()
    want = up.to(torch.uint8).expand(-1, 3, -1, -1)
    train_idx, test_idx = split_indices()
    s = data.load_splits("digits", val_size=100)
    assert torch.equal(s.test_x, want[test_idx]) and torch.equal(s.val_x, want[train_idx[:100]])
    assert torch.equal(s.train_x, want[train_idx[100:]])
    assert torch.equal(s.train_y, torch.from_numpy(raw.target)[train_idx[100:]])
    assert up.max() == 255 and up.min() == 0


# ---------------------------------------------------------------------------------------------
# augmentation


def _reference_crop_flip(x, dy, dx, flip, padding):
    """Per-sample loop: zero-pad, slice the window, maybe flip (what torchvision does per image)."""
    out = torch.empty_like(x)
    h, w = x.shape[-2:]
    for k in range(len(x)):
        p = F.pad(x[k], (padding,) * 4)
        win = p[:, int(dy[k]):int(dy[k]) + h, int(dx[k]):int(dx[k]) + w]
        out[k] = win.flip(-1) if flip[k] else win
    return out


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_crop_flip_matches_reference_loop(dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randint(1, 256, (64, 3, 32, 32), generator=g).to(dtype)
    if dtype.is_floating_point:
        x /= 255
    for padding in (4, 0, 2):
        g.manual_seed(11)
        params = crop_flip_params(len(x), g, padding)
        g.manual_seed(11)
        out = random_crop_flip(x, g, padding=padding)
        assert out.dtype == dtype and out.shape == x.shape
        assert 0 <= out.min() and out.max() <= x.max()
        assert torch.equal(out, _reference_crop_flip(x, *params, padding))
        assert torch.equal(out, crop_flip(x, *params, padding=padding))


def test_crop_flip_randomness():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 256, (512, 3, 32, 32), dtype=torch.uint8, generator=g)
    a, b = random_crop_flip(x, g), random_crop_flip(x, g)
    assert not torch.equal(a, b)  # fresh draws differ
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(random_crop_flip(x, g1), random_crop_flip(x, g2))  # same seed, same output
    # padding 0: each output is the image or its mirror, and both occur
    out = random_crop_flip(x, g, padding=0)
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all() and same.any() and mirrored.any()
    # offsets cover [0, 2 * padding] on both axes, roughly uniformly; flips are about half
    dy, dx, flip = crop_flip_params(9000, g, padding=4)
    for off in (dy, dx):
        counts = torch.bincount(off, minlength=9)
        assert len(counts) == 9 and counts.min() > 800 and counts.max() < 1200
    assert 0.45 < flip.float().mean() < 0.55
    # zero padding shows up: a shifted crop of an all-positive image contains zeros
    out = random_crop_flip(x, g, padding=4)
    assert (out == 0).flatten(1).any(1).float().mean() > 0.8


@pytest.mark.cuda
@CUDA
def test_crop_flip_same_on_cpu_and_gpu():
    x = torch.randint(0, 256, (128, 3, 32, 32), dtype=torch.uint8)
    a = random_crop_flip(x, torch.Generator().manual_seed(1))
    b = random_crop_flip(x.cuda(), torch.Generator().manual_seed(1))
    assert b.is_cuda and torch.equal(a, b.cpu())


# ---------------------------------------------------------------------------------------------
# TrainLoader


def _indexed_set(n):
    """Image k is filled with value k and labelled k, so batches reveal which samples they hold."""
    x = torch.arange(n, dtype=torch.uint8)[:, None, None, None].expand(n, 3, 32, 32).contiguous()
    return x, torch.arange(n)


def test_train_loader_epoch_covers_every_index_once():
    x, y = _indexed_set(103)
    loader = data.TrainLoader(x, y, 16, generator=torch.Generator().manual_seed(0),
                              augment="none", device="cpu")
    assert len(loader) == 7
    orders = []
    for _ in range(2):
        batches = list(loader)
        assert [len(b[1]) for b in batches] == [16] * 6 + [7]
        for xb, yb in batches:
            assert xb.dtype == torch.float32 and yb.dtype == torch.int64
            assert xb.device.type == yb.device.type == "cpu"
            assert torch.equal(xb[:, :, 0, 0] * 255, yb[:, None].float().expand(-1, 3))  # paired
        order = torch.cat([b[1] for b in batches])
        assert sorted(order.tolist()) == list(range(103))
        orders.append(order)
    assert not torch.equal(orders[0], orders[1])  # reshuffled every epoch
    dropped = data.TrainLoader(x, y, 16, generator=torch.Generator().manual_seed(0),
                               augment="none", drop_last=True)
    seen = torch.cat([yb for _, yb in dropped])
    assert len(dropped) == 6 and len(seen) == 96 and len(set(seen.tolist())) == 96


def test_train_loader_augments_and_stays_in_range():
    x = torch.randint(1, 256, (40, 3, 32, 32), dtype=torch.uint8)
    loader = data.TrainLoader(x, torch.zeros(40, dtype=torch.long), 40,
                              generator=torch.Generator().manual_seed(0))
    (xb, _), = list(loader)
    assert xb.shape == (40, 3, 32, 32) and 0 <= xb.min() and xb.max() <= 1
    assert (xb == 0).any()  # zero padding from the random crops


def test_train_loader_resume_gives_identical_next_epoch():
    x = torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8)
    y = torch.randint(0, 10, (50,))
    run = data.TrainLoader(x, y, 8, generator=torch.Generator().manual_seed(0))
    list(run)  # epoch 1
    state = run.state_dict()
    state = pickle.loads(pickle.dumps(state))  # as if saved with a checkpoint
    epoch2 = list(run)
    resumed = data.TrainLoader(x, y, 8, generator=torch.Generator().manual_seed(999))
    resumed.load_state_dict(state)
    for (xa, ya), (xb, yb) in zip(epoch2, resumed, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.cuda
@CUDA
def test_train_loader_on_gpu_matches_cpu():
    x, y = torch.randint(0, 256, (30, 3, 32, 32), dtype=torch.uint8), torch.arange(30)
    cpu = data.TrainLoader(x, y, 8, generator=torch.Generator().manual_seed(2), device="cpu")
    gpu = data.TrainLoader(x, y, 8, generator=torch.Generator().manual_seed(2), device="cuda")
    assert gpu.x.is_cuda and gpu.x.dtype == torch.uint8
    for (xa, ya), (xb, yb) in zip(cpu, gpu, strict=True):
        assert xb.is_cuda and yb.is_cuda and torch.equal(xa, xb.cpu()) and torch.equal(ya, yb.cpu())


def test_iterate_batches_in_order():
    x, y = _indexed_set(10)
    batches = list(data.iterate_batches(x, y, 4, device="cpu"))
    assert [len(b[1]) for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([b[1] for b in batches]), y)
    assert torch.equal(torch.cat([b[0] for b in batches]), data.to_float(x))
    xf = data.to_float(x)
    assert torch.equal(torch.cat([b[0] for b in data.iterate_batches(xf, y, 3)]), xf)
    with pytest.raises(TypeError):
        data.to_float(xf)


def test_loader_and_augment_argument_errors():
    x, y = _indexed_set(4)
    g = torch.Generator().manual_seed(0)
    with pytest.raises(TypeError, match="uint8"):
        data.TrainLoader(x.float(), y, 2, generator=g)
    with pytest.raises(ValueError, match="augment"):
        data.TrainLoader(x, y, 2, generator=g, augment="autoaugment")
    with pytest.raises(ValueError, match="labels"):
        data.TrainLoader(x, y[:3], 2, generator=g)
    with pytest.raises(ValueError, match="N×C×H×W"):
        random_crop_flip(x[0], g)
