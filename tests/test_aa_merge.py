"""AutoAttack merges check what they merge (eval/aa_chunks.py): a chunk whose stages are not nested
or whose clean outcome is not the model's is refused by name, at --merge and when reused; --merge
attacks nothing, not even a malformed chunk; missing chunks because of another --chunk-size are
named as such."""
from __future__ import annotations

import json

import pytest
import torch

import models
from at.target import load_target
from eval import autoattack
from eval.common import EvalError
from eval.precision import evaluation_precision

NAME = "autoattack-standard-apgd-ce_linf_eps8-255_n8_net"
ARGS = dict(n_ex=8, chunk_size=4, attacks=["apgd-ce"], batch_size=4, progress=False)


@pytest.fixture()
def target(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "net.pt"
    torch.save(models.build_model("wrn-16-1", 10, dataset="digits").state_dict(), path)
    return load_target(path, "best", "wrn-16-1", "digits", device="cpu")


def _cli(t, *extra):
    return [str(t.checkpoint), "--arch", "wrn-16-1", "--dataset", "digits", "--device", "cpu",
            "--n-ex", "8", "--attacks", "apgd-ce", "--batch-size", "4", *extra]


def _one_line(capsys, code, *needles):
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


@evaluation_precision()
def test_a_hand_edited_or_broken_chunk_is_refused_by_name(target, capsys):
    t = target
    for i in range(2):
        autoattack.evaluate(t, shard=(i, 2), **ARGS)
    chunks = t.out_dir / f"{NAME}_chunks"
    path = chunks / "chunk_000004_000008.pt"
    good = torch.load(path, weights_only=True)
    clean = good["outcome"]["clean"]
    assert not clean.all()  # an untrained network: some images are wrong already

    # Every image "survives" the attack, wrong clean ones too: clean 10 %, AutoAttack 100 %.
    edited = {**good, "outcome": {"clean": clean, "apgd-ce": torch.ones(4, dtype=torch.bool)}}
    torch.save(edited, path)
    code = autoattack.main(_cli(t, "--chunk-size", "4", "--merge"))
    _one_line(capsys, code, f"refusing to merge {path}", "correct after apgd-ce but not after "
                                                        "clean")
    assert not (t.out_dir / f"{NAME}.json").exists()
    # The same chunk reused by an evaluation that computes is refused too (and kept).
    with pytest.raises(EvalError, match=f"refusing to reuse {path}"):
        autoattack.evaluate(t, **ARGS)
    assert torch.load(path, weights_only=True)["outcome"]["apgd-ce"].all()

    # Nested stages, but a clean outcome that is not the model's.
    flipped = {**good, "outcome": {"clean": ~clean, "apgd-ce": torch.zeros(4, dtype=torch.bool)}}
    torch.save(flipped, path)
    code = autoattack.main(_cli(t, "--chunk-size", "4", "--merge"))
    _one_line(capsys, code, f"refusing to merge {path}", "clean outcome differs from the "
                                                        "model's predictions")

    # A malformed chunk is refused at --merge, not recomputed (the merge attacks nothing).
    torch.save({**good, "outcome": {"clean": clean[:2], "apgd-ce": clean[:2]}}, path)
    before = path.read_bytes()
    code = autoattack.main(_cli(t, "--chunk-size", "4", "--merge"))
    _one_line(capsys, code, f"refusing to merge {path}", "not a boolean vector of its 4 images")
    assert path.read_bytes() == before

    torch.save(good, path)
    assert autoattack.main(_cli(t, "--chunk-size", "4", "--merge")) == 0
    merged = json.loads((t.out_dir / f"{NAME}.json").read_text())
    assert merged["robust_acc"] <= merged["clean_acc"]


@evaluation_precision()
def test_merge_with_another_chunk_size_says_so(target, capsys):
    for i in range(2):
        autoattack.evaluate(target, shard=(i, 2), **ARGS)
    code = autoattack.main(_cli(target, "--chunk-size", "8", "--merge"))
    _one_line(capsys, code, "1 of 1 chunks missing (chunk_000000_000008.pt)",
              "2 chunk(s) of another --chunk-size (4")
