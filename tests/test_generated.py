"""Generated-image sets: preparation from .npz parts, the on-disk reader, and the mixing loader
(per-batch counts, sampling without / with replacement, per-rank shares, resume)."""
from __future__ import annotations

import errno
import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import data
from data import prepare_generated
from data.generated import IMAGE_BYTES
from data.prepare_generated import prepare
from errors import DataError

try:
    import resource
except ImportError:  # not on Windows
    resource = None

ROOT = Path(__file__).resolve().parents[1]


def _part(path: Path, n: int, start: int, num_classes: int = 10, compressed: bool = False,
          label_dtype=np.int64) -> tuple[np.ndarray, np.ndarray]:
    """n images whose pixels encode their global index; written as DM-Improves-AT's npz."""
    rng = np.random.default_rng(start)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = (np.arange(start, start + n) % 256).astype(np.uint8)
    labels = rng.integers(0, num_classes, n).astype(label_dtype)
    (np.savez_compressed if compressed else np.savez)(path, image=images, label=labels)
    return images, labels


def _silent(_msg: str) -> None:
    pass


def test_prepare_concatenates_parts_in_chunks(tmp_path):
    a = _part(tmp_path / "a.npz", 23, 0)
    b = _part(tmp_path / "b.npz", 17, 23, compressed=True, label_dtype=np.int32)
    meta = prepare([tmp_path / "a.npz", tmp_path / "b.npz"], tmp_path / "out", 10, chunk=5,
                   log=_silent)
    images = np.load(tmp_path / "out" / "images.npy", mmap_mode="r")
    labels = np.load(tmp_path / "out" / "labels.npy")
    assert images.shape == (40, 32, 32, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int64
    assert np.array_equal(images, np.concatenate([a[0], b[0]]))
    assert np.array_equal(labels, np.concatenate([a[1], b[1]]))
    assert meta["n"] == 40 and meta["class_counts"] == np.bincount(labels, minlength=10).tolist()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == \
        ["images.npy", "labels.npy", "meta.json"]
    # Running it again with the same inputs does nothing; other inputs are refused.
    assert prepare([tmp_path / "a.npz", tmp_path / "b.npz"], tmp_path / "out", 10,
                   log=_silent) == meta
    with pytest.raises(DataError, match="other inputs"):
        prepare([tmp_path / "a.npz"], tmp_path / "out", 10, log=_silent)


def test_prepare_resumes_after_interruption(tmp_path):
    _part(tmp_path / "a.npz", 30, 0)
    _part(tmp_path / "b.npz", 30, 30)
    full = prepare([tmp_path / "a.npz", tmp_path / "b.npz"], tmp_path / "ref", 10, chunk=4,
                   log=_silent)
    messages = []

    def interrupt(msg):
        messages.append(msg)
        if len(messages) == 10:  # after 2 chunks of part b (part a takes 8 chunks of 4)
            raise KeyboardInterrupt

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        prepare([tmp_path / "a.npz", tmp_path / "b.npz"], out, 10, chunk=4, log=interrupt)
    assert not (out / "meta.json").exists() and not (out / "images.npy").exists()
    assert (out / "images.npy.partial").exists()
    second = []
    meta = prepare([tmp_path / "a.npz", tmp_path / "b.npz"], out, 10, chunk=4, log=second.append)
    assert second[0] == "resuming: 38 of 60 images already converted"
    assert sum(": " in m and "/30" in m for m in second) == 6  # only the 22 missing images
    assert meta["class_counts"] == full["class_counts"]
    for name in ("images.npy", "labels.npy"):
        assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["images.npy", "labels.npy", "meta.json"]


def _nothing_written(out: Path) -> bool:
    return not out.exists() or not any(out.iterdir())


@pytest.mark.slow
def test_prepare_rejects_truncated_part_before_writing(tmp_path, capsys):
    _part(tmp_path / "good.npz", 20, 0)
    _part(tmp_path / "cut.npz", 20, 20)
    raw = (tmp_path / "cut.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(raw[:len(raw) // 2])
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"cut\.npz.*(truncated|corrupt)"):
        prepare([tmp_path / "good.npz", tmp_path / "cut.npz"], out, 10, log=_silent)
    assert _nothing_written(out)
    # The command line: one line on stderr, exit status 1, nothing written.
    proc = _main(capsys, str(tmp_path / "good.npz"), str(tmp_path / "cut.npz"), "--out", str(out),
                 "--num-classes", "10")
    assert proc.returncode == 1 and _nothing_written(out)
    assert proc.stderr.startswith("prepare_generated: error: ") and \
        proc.stderr.count("\n") == 1


def test_prepare_removes_partial_output_on_corrupt_data(tmp_path):
    _part(tmp_path / "a.npz", 20, 0)
    path = tmp_path / "a.npz"
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("image.npy")
    raw = bytearray(path.read_bytes())
    raw[info.header_offset + 30 + len(info.filename) + 200 + 3072 * 10] ^= 0xFF  # image 10
    path.write_bytes(bytes(raw))
    # The directories this run created go too (an empty --out tree is no prepared set) ...
    out = tmp_path / "new" / "out"
    with pytest.raises(DataError, match="corrupt data.*CRC"):
        prepare([path], out, 10, chunk=4, log=_silent)
    assert not (tmp_path / "new").exists()
    # ... but never a directory, or a file in it, that was there before.
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="corrupt data.*CRC"):
        prepare([path], kept / "out", 10, chunk=4, log=_silent)
    assert sorted(p.name for p in kept.iterdir()) == ["notes.txt"]
    (kept / "out").mkdir()
    with pytest.raises(DataError, match="corrupt data.*CRC"):
        prepare([path], kept / "out", 10, chunk=4, log=_silent)
    assert (kept / "out").is_dir() and not any((kept / "out").iterdir())


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data.prepare_generated", *args], cwd=ROOT,
                          capture_output=True, text=True, **kw)


def _main(capsys, *args: str) -> subprocess.CompletedProcess:
    """`python -m data.prepare_generated ARGS` in this process (no interpreter to start): its
    exit status and what it printed."""
    capsys.readouterr()
    code = prepare_generated.main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def _one_line_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    # Progress lines may come first; the error is the last line, alone, and no traceback.
    lines = proc.stderr.splitlines()
    assert proc.returncode == 1, proc.stderr
    assert lines[-1].startswith("prepare_generated: error: ") and needle in lines[-1], lines
    assert "Traceback" not in proc.stderr and sum("error" in line for line in lines) == 1, lines


def test_prepare_names_the_exact_row_of_a_bad_label(tmp_path):
    labels = np.arange(20) % 10
    labels[13] = 12  # inside the chunk of rows 12..15
    np.savez(tmp_path / "bad.npz", image=np.zeros((20, 32, 32, 3), np.uint8), label=labels)
    with pytest.raises(DataError, match=r"bad\.npz: label 12 at row 13 is outside \[0, 9\]"):
        prepare([tmp_path / "bad.npz"], tmp_path / "out", 10, chunk=4, log=_silent)
    assert not (tmp_path / "out").exists()


def test_prepare_out_that_is_a_file_or_unwritable(tmp_path, capsys):
    _part(tmp_path / "a.npz", 8, 0)
    (tmp_path / "file").write_text("keep me")
    _one_line_error(_main(capsys, str(tmp_path / "a.npz"), "--out", str(tmp_path / "file"),
                          "--num-classes", "10"), "is a file, not a directory")
    assert (tmp_path / "file").read_text() == "keep me"
    # Below a file no directory can be made (what a read-only place gives too).
    _one_line_error(_main(capsys, str(tmp_path / "a.npz"), "--out", str(tmp_path / "file" / "out"),
                          "--num-classes", "10"), "cannot write to --out")
    assert (tmp_path / "file").read_text() == "keep me"


def test_prepare_damaged_records_in_out_are_one_line_errors(tmp_path):
    _part(tmp_path / "a.npz", 8, 0)
    for name in ("meta.json", ".prepare_progress.json"):
        out = tmp_path / name.strip(".")
        out.mkdir()
        (out / name).write_text('{"n": 8, "sour')  # cut off mid-write by a full disk
        with pytest.raises(DataError, match=f"{name} is unreadable"):
            prepare([tmp_path / "a.npz"], out, 10, log=_silent)
        assert [p.name for p in out.iterdir()] == [name]


class _FullDisk:
    """A file whose writes fail with ENOSPC once `room` bytes are written (a disk filling up)."""

    def __init__(self, f, room: list[int]):
        self._f, self._room = f, room

    def write(self, data) -> int:
        self._room[0] -= len(data)
        if self._room[0] < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def test_prepare_full_disk_removes_partial_output(tmp_path, monkeypatch):
    _part(tmp_path / "a.npz", 20, 0)
    room = [3 * 4 * IMAGE_BYTES]  # the disk fills up during the second chunk of images
    monkeypatch.setattr(prepare_generated, "open",
                        lambda *a, **kw: _FullDisk(open(*a, **kw), room), raising=False)
    out = tmp_path / "new" / "out"
    with pytest.raises(DataError, match=r"cannot write to --out .*No space left on device"):
        prepare([tmp_path / "a.npz"], out, 10, chunk=4, log=_silent)
    assert not (tmp_path / "new").exists()
    monkeypatch.undo()
    assert prepare([tmp_path / "a.npz"], out, 10, chunk=4, log=_silent)["n"] == 20


@pytest.mark.skipif(resource is None, reason="needs RLIMIT_FSIZE (POSIX)")
def test_prepare_cli_failed_write_is_one_line(tmp_path):
    # A real failed write: the process may not grow a file past 40 kB (EFBIG, as a full disk
    # fails with ENOSPC); 20 images take 61 kB.
    _part(tmp_path / "a.npz", 20, 0)
    limit = 40_000

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = _cli(str(tmp_path / "a.npz"), "--out", str(tmp_path / "new" / "out"),
                "--num-classes", "10", "--chunk", "4", preexec_fn=small_files)
    _one_line_error(proc, "cannot write to --out")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("image,label,message", [
    (np.zeros((4, 32, 32, 3), np.float32), np.zeros(4, np.int64), "expected uint8"),
    (np.zeros((4, 3, 32, 32), np.uint8), np.zeros(4, np.int64), "expected uint8"),
    (np.zeros((4, 32, 32, 3), np.uint8), np.zeros(3, np.int64), "4 images but 3 labels"),
    (np.zeros((4, 32, 32, 3), np.uint8), np.zeros(4, np.float64), "integer vector"),
    (np.zeros((4, 32, 32, 3), np.uint8), np.array([0, 1, 10, 2]), "label 10"),
    (np.zeros((4, 32, 32, 3), np.uint8), np.array([0, -1, 1, 2]), "label -1"),
])
def test_prepare_rejects_bad_arrays(tmp_path, image, label, message):
    np.savez(tmp_path / "bad.npz", image=image, label=label)
    with pytest.raises(DataError, match=message):
        prepare([tmp_path / "bad.npz"], tmp_path / "out", 10, chunk=2, log=_silent)
    assert _nothing_written(tmp_path / "out")


def test_prepare_rejects_missing_key_and_file(tmp_path):
    np.savez(tmp_path / "x.npz", images=np.zeros((2, 32, 32, 3), np.uint8),
             label=np.zeros(2, np.int64))
    with pytest.raises(DataError, match="no 'image' array"):
        prepare([tmp_path / "x.npz"], tmp_path / "out", 10, log=_silent)
    with pytest.raises(DataError, match="no such file"):
        prepare([tmp_path / "missing.npz"], tmp_path / "out", 10, log=_silent)


# ---------------------------------------------------------------------------------------------
# Reading and mixing


def _generated_dir(tmp_path: Path, n: int = 50, num_classes: int = 10) -> Path:
    """Generated image j: channel 0 = 255 (marks 'generated'), channel 1 = j, label j % C."""
    images = np.zeros((n, 32, 32, 3), np.uint8)
    images[..., 0] = 255
    images[..., 1] = np.arange(n, dtype=np.uint8)[:, None, None]
    np.savez(tmp_path / "gen.npz", image=images, label=np.arange(n) % num_classes)
    prepare([tmp_path / "gen.npz"], tmp_path / "gen", num_classes, log=_silent)
    return tmp_path / "gen"


def _real(n: int = 100):
    """Real image k: every pixel k (< 255), label k % 10."""
    x = torch.arange(n, dtype=torch.uint8)[:, None, None, None].expand(n, 3, 32, 32).contiguous()
    return x, torch.arange(n) % 10


def _decode(xb: torch.Tensor) -> tuple[list[int], list[int]]:
    """(real indices, generated indices) held by an unaugmented batch."""
    px = (xb[:, :, 0, 0] * 255).round().long()
    generated = px[:, 0] == 255
    return px[~generated, 0].tolist(), px[generated, 1].tolist()


def _loader(gen, rank=0, world=1, seed=0, batch=20, **kw):
    x, y = _real()
    return data.TrainLoader(x, y, batch, generator=torch.Generator().manual_seed(seed),
                            augment="none", generated=gen, fraction=0.7, epoch_size=100,
                            rank=rank, world_size=world, **kw)


def test_generated_set_reads_images_and_labels(tmp_path):
    gen = data.GeneratedSet(_generated_dir(tmp_path), 10)
    idx = torch.tensor([7, 3, 7, 49, 0])
    images, labels = gen.gather(idx).wait()
    assert images.shape == (5, 32, 32, 3) and images[:, 0, 0, 1].tolist() == [7, 3, 7, 49, 0]
    assert (images[..., 0] == 255).all() and labels.tolist() == [7, 3, 7, 9, 0]
    assert gen.labels.dtype == torch.uint8  # 1 byte per label in memory
    with pytest.raises(DataError, match="10-class images; the dataset has 100"):
        data.GeneratedSet(tmp_path / "gen", 100)
    with pytest.raises(DataError, match="no meta.json"):
        data.GeneratedSet(tmp_path / "nothing", 10)
    gen.close()


def test_damaged_generated_sets_are_one_line_errors_naming_the_file(tmp_path):
    path = _generated_dir(tmp_path)
    labels = np.load(path / "labels.npy")
    labels[17] = 12  # another set's labels: 12 is no class of a 10-class set
    np.save(path / "labels.npy", labels)
    with pytest.raises(DataError,
                       match=r"labels.npy: label 12 at row 17 is outside \[0, 10\)"):
        data.GeneratedSet(path, 10)
    images = path / "images.npy"
    images.write_bytes(images.read_bytes()[:1000])
    with pytest.raises(DataError, match=r"images.npy is not a complete .npy file"):
        data.GeneratedSet(path, 10)


def test_mixed_batches_have_exact_counts_and_sampling_rules(tmp_path):
    gen = data.GeneratedSet(_generated_dir(tmp_path), 10)
    loader = _loader(gen)
    assert len(loader) == 5  # ceil(epoch_size / batch)
    real_stream = []
    for _ in range(3):
        for xb, yb in loader:
            real, generated = _decode(xb)
            # 20 - round(20 * 0.7) = 6 real, 14 generated, every batch
            assert len(real) == 6 and len(generated) == 14 and len(yb) == 20
            assert yb.tolist() == [k % 10 for k in real] + [j % 10 for j in generated]
            real_stream += real
    # Real images without replacement within each pass of 100 (90 = the 15 batches' 6 each).
    assert len(real_stream) == 90 and len(set(real_stream)) == 90
    # Generated: uniform with replacement over 50 images; in 15 * 14 draws repeats are certain.
    gen.close()


def test_ranks_get_disjoint_shares_of_the_same_global_batches(tmp_path):
    gen = data.GeneratedSet(_generated_dir(tmp_path), 10)
    for world, batch in ((2, 20), (3, 20)):
        single = list(_loader(gen, batch=batch))
        shares = [list(_loader(gen, rank=r, world=world, batch=batch)) for r in range(world)]
        for step, (xb, _) in enumerate(single):
            real, generated = _decode(xb)
            parts = [_decode(shares[r][step][0]) for r in range(world)]
            sizes = [len(p[0]) + len(p[1]) for p in parts]
            assert sum(sizes) == batch and max(sizes) - min(sizes) <= 1
            assert sorted(sum((p[0] for p in parts), [])) == sorted(real)  # disjoint, complete
            assert sorted(sum((p[1] for p in parts), [])) == sorted(generated)
    gen.close()


def test_real_only_batches_split_across_ranks():
    x, y = _real(103)
    single = data.TrainLoader(x, y, 16, generator=torch.Generator().manual_seed(0),
                              augment="none")
    shares = [data.TrainLoader(x, y, 16, generator=torch.Generator().manual_seed(0),
                               augment="none", rank=r, world_size=2) for r in range(2)]
    batches = list(single)
    per_rank = [list(s) for s in shares]
    for step, (_, yb) in enumerate(batches):
        ids = [(xs[:, 0, 0, 0] * 255).round().long().tolist()
               for xs, _ in (per_rank[0][step], per_rank[1][step])]
        assert sorted(ids[0] + ids[1]) == sorted((batches[step][0][:, 0, 0, 0] * 255).round()
                                                 .long().tolist())
        assert shares[0].global_size == len(yb) or step < len(batches) - 1


def test_mixed_loader_resume_between_epochs_is_exact(tmp_path):
    gen = data.GeneratedSet(_generated_dir(tmp_path), 10)
    run = _loader(gen, batch=16)
    run_aug = data.TrainLoader(*_real(), 16, generator=torch.Generator().manual_seed(0),
                               generated=gen, epoch_size=100)
    for loader in (run, run_aug):
        list(loader)
        list(loader)
        state = pickle.loads(pickle.dumps(loader.state_dict()))
        after = list(loader)
        fresh = data.TrainLoader(*_real(), 16, generator=torch.Generator().manual_seed(5),
                                 augment=loader.augment, generated=gen, epoch_size=100)
        fresh.load_state_dict(state)
        for (xa, ya), (xb, yb) in zip(after, fresh, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    gen.close()


def test_generated_config_errors(tmp_path):
    gen = data.GeneratedSet(_generated_dir(tmp_path), 10)
    with pytest.raises(ValueError, match="fraction"):
        data.TrainLoader(*_real(), 16, generator=torch.Generator(), generated=gen, fraction=1.5)
    with pytest.raises(ValueError, match="rank 2 outside"):
        data.TrainLoader(*_real(), 16, generator=torch.Generator(), rank=2, world_size=2)
    meta = json.loads((tmp_path / "gen" / "meta.json").read_text())
    assert meta["n"] == 50
    gen.close()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mixed_loader_on_gpu_matches_cpu(tmp_path):
    """Pinned buffers and asynchronous copies deliver the same batches as the CPU path."""
    gen = data.GeneratedSet(_generated_dir(tmp_path), 10)
    x, y = _real()
    loaders = [data.TrainLoader(x, y, 16, generator=torch.Generator().manual_seed(3),
                                generated=gen, epoch_size=100, device=device)
               for device in ("cpu", "cuda")]
    for (xa, ya), (xb, yb) in zip(*loaders, strict=True):
        assert xb.is_cuda and torch.equal(xa, xb.cpu()) and torch.equal(ya, yb.cpu())
    gen.close()
