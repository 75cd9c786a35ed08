"""CIFAR-10-C evaluation on files generated in RobustBench's exact on-disk layout: per corruption
a uint8 (50000, 32, 32, 3) .npy (severities 1..5 of 10000 images, stacked) and labels.npy. Only
the rows the test reads are written; the rest of each file stays a sparse hole."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from at.target import load_target
from eval import corruptions
from eval.common import EvalError
from eval.results import corruptions_name
from models import build_model

N = 12


def _write_layout(folder, model, names):
    """Images whose labels are the model's own predictions at severity 1 (so accuracy there is
    100%) and the predictions' successor class at severity 2 (accuracy 0%)."""
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    labels = np.lib.format.open_memmap(folder / "labels.npy", mode="w+", dtype=np.int64,
                                       shape=(50000,))
    for name in names:
        arr = np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=np.uint8,
                                        shape=(50000, 32, 32, 3))
        for s in range(1, 6):
            img = torch.randint(0, 256, (N, 32, 32, 3), generator=g, dtype=torch.uint8)
            arr[(s - 1) * 10000:(s - 1) * 10000 + N] = img.numpy()
            if name == names[0]:
                with torch.no_grad():
                    pred = model(img.permute(0, 3, 1, 2).float() / 255).argmax(1).numpy()
                labels[(s - 1) * 10000:(s - 1) * 10000 + N] = pred if s != 2 else (pred + 1) % 10
        arr.flush()
        del arr
    labels.flush()


@pytest.fixture()
def target(tmp_path):
    torch.manual_seed(0)
    model = build_model("wrn-16-1", 10)
    path = tmp_path / "net.pt"
    torch.save(model.state_dict(), path)
    return load_target(path, arch="wrn-16-1", dataset="cifar10", device="cpu")


def test_per_corruption_and_severity_accuracy(target, tmp_path, capsys):
    root = tmp_path / "data"
    _write_layout(root / "CIFAR-10-C", target.model, ["fog", "snow"])
    r = corruptions.evaluate(target, root, n_ex=N, corruptions=["fog", "snow"], batch_size=5)
    assert r["accuracy"]["fog"]["1"] == 100.0 and r["accuracy"]["fog"]["2"] == 0.0
    for s in "12345":
        assert 0 <= r["accuracy"]["snow"][s] <= 100
    values = [v for c in r["accuracy"].values() for v in c.values()]
    assert r["mean"] == pytest.approx(sum(values) / 10, abs=0.01)
    assert r["mean_per_severity"]["1"] == pytest.approx(
        (r["accuracy"]["fog"]["1"] + r["accuracy"]["snow"]["1"]) / 2, abs=0.01)
    assert r["full_benchmark"] is False
    saved_path = target.out_dir / f"corruptions-fog+snow_s12345_n{N}_net.json"
    saved = json.loads(saved_path.read_text())
    assert saved["accuracy"] == r["accuracy"] and saved_path.name == Path(r["path"]).name
    # The CLI, with the folder itself as the root: another subset is another file, and the
    # first result stays as it was.
    before = saved_path.read_bytes()
    assert corruptions.main([str(target.checkpoint), "--arch", "wrn-16-1", "--dataset",
                             "cifar10", "--device", "cpu", "--corruptions-root",
                             str(root / "CIFAR-10-C"), "--corruptions", "fog", "--n-ex",
                             str(N), "--severities", "1,2"]) == 0
    assert "fog" in capsys.readouterr().out
    assert saved_path.read_bytes() == before
    other = json.loads((target.out_dir / f"corruptions-fog_s12_n{N}_net.json").read_text())
    assert other["severities"] == [1, 2] and other["corruptions"] == ["fog"]


def test_result_names_keep_the_full_benchmark_name_and_key_subsets():
    every = list(corruptions.CORRUPTIONS)
    assert corruptions_name(every, every, [1, 2, 3, 4, 5], 10000, "best") == \
        "corruptions_n10000_best"
    names = {corruptions_name(every[:k], every, [1, 2, 3, 4, 5], 10000, "best")
             for k in range(1, 15)}
    names |= {corruptions_name(every, every, [s], 10000, "best") for s in range(1, 6)}
    assert len(names) == 14 + 5 and "corruptions_n10000_best" not in names


def test_bad_corruption_data_gives_one_line_errors(target, tmp_path, capsys):
    root = tmp_path / "data"
    _write_layout(root / "CIFAR-10-C", target.model, ["fog"])
    base = [str(target.checkpoint), "--arch", "wrn-16-1", "--dataset", "cifar10", "--device",
            "cpu", "--n-ex", "4"]

    def error(*args):
        assert corruptions.main([*base, *args]) == 1
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err
        return err

    assert "does not exist" in error("--corruptions-root", str(tmp_path / "nowhere"))
    assert "lacks 14 corruption files" in error("--corruptions-root", str(root))
    # A truncated download.
    fog = root / "CIFAR-10-C" / "fog.npy"
    fog.write_bytes(fog.read_bytes()[:1000])
    assert f"corrupt .npy file {fog}" in error("--corruptions-root", str(root),
                                               "--corruptions", "fog")
    fog.write_bytes(b"not an npy file at all")
    assert "corrupt .npy file" in error("--corruptions-root", str(root), "--corruptions", "fog")
    np.save(fog, np.zeros((10, 32, 32, 3), dtype=np.uint8))
    assert "expected uint8 (50000, 32, 32, 3)" in error("--corruptions-root", str(root),
                                                         "--corruptions", "fog")
    assert "unknown corruption 'mist'" in error("--corruptions-root", str(root),
                                                "--corruptions", "mist")
    digits = tmp_path / "d.pt"
    torch.save(build_model("wrn-16-1", 10).state_dict(), digits)
    with pytest.raises(EvalError, match="not digits"):
        corruptions.evaluate(load_target(digits, arch="wrn-16-1", dataset="digits",
                                         device="cpu"), root)
