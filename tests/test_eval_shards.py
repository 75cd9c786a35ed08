"""Sharded AutoAttack: two torchrun processes (gloo, CPU) each evaluate half the chunks and rank 0
merges them into the JSON an unsharded run writes; a merge names missing chunks and refuses
chunks of another checkpoint; bad shard specs are one-line errors."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from at.config import REPO_ROOT
from at.target import load_target
from eval import autoattack
from eval.common import EvalError
from eval.precision import evaluation_precision

ARGS = dict(n_ex=16, chunk_size=4, attacks=["apgd-ce"], batch_size=4, eps="16/255")
NAME = "autoattack-standard-apgd-ce_linf_eps16-255_n16_best"
# What legitimately differs between two evaluations of the same thing (the two copies of the
# run, same bytes, live in different directories).
VOLATILE = {"seconds", "seconds_this_call", "chunks_reused", "command", "path", "checkpoint"}


@pytest.fixture()
def run(learned, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(learned["ikl_at"][0], out, ignore=shutil.ignore_patterns("eval"))
    return out


@pytest.fixture()
def stub(digits_run, tmp_path):
    """A copy of the barely trained run: merging and refusing chunks need no model that learned."""
    out = tmp_path / "stub"
    shutil.copytree(digits_run, out)
    return out


def test_torchrun_shards_merge_to_the_unsharded_result(run, tmp_path):
    straight = tmp_path / "straight"
    shutil.copytree(run, straight)
    with evaluation_precision():  # as the command line runs (the chunks record TF32)
        whole = autoattack.evaluate(load_target(straight, "best", device="cpu"),
                                    progress=False, **ARGS)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "eval.autoattack", str(run), "--n-ex", "16", "--chunk-size", "4", "--attacks",
         "apgd-ce", "--batch-size", "4", "--eps", "16/255", "--device", "cpu"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    chunks = sorted(p.name for p in (run / "eval" / f"{NAME}_chunks").glob("chunk_*.pt"))
    assert len(chunks) == 4
    logs = sorted(p.name for p in (run / "eval").glob(f"{NAME}_shard*of2.log"))
    assert logs == [f"{NAME}_shard0of2.log", f"{NAME}_shard1of2.log"]  # both ranks worked
    merged = json.loads((run / "eval" / f"{NAME}.json").read_text())
    assert merged["chunks_reused"] == 4
    assert {k: v for k, v in merged.items() if k not in VOLATILE} == \
        {k: v for k, v in whole.items() if k not in VOLATILE}
    assert whole["robust_acc"] < whole["clean_acc"]  # the attack did something


@evaluation_precision()  # as the command line runs (the chunks record TF32)
def test_merge_names_missing_chunks_and_refuses_other_checkpoints(stub, capsys):
    t = load_target(stub, "best", device="cpu")
    with pytest.raises(EvalError, match="nothing to merge"):
        autoattack.evaluate(t, merge=True, progress=False, **ARGS)
    done = autoattack.evaluate(t, shard=(0, 2), progress=False, **ARGS)
    assert done == {**done, "shard": "0/2", "chunks": 2}
    assert not (t.out_dir / f"{NAME}.json").exists()  # a shard writes no result
    with pytest.raises(EvalError, match=r"2 of 4 chunks missing \(chunk_000004_000008.pt, "
                                        r"chunk_000012_000016.pt\)"):
        autoattack.evaluate(t, merge=True, progress=False, **ARGS)
    autoattack.evaluate(t, shard=(1, 2), progress=False, **ARGS)
    # A chunk computed from another checkpoint (the run was retrained between the shards).
    path = t.out_dir / f"{NAME}_chunks" / "chunk_000004_000008.pt"
    chunk = torch.load(path, weights_only=True)
    chunk["fingerprint"]["checkpoint_sha256"] = "0" * 64
    torch.save(chunk, path)
    args = [str(stub), "--device", "cpu", "--n-ex", "16", "--chunk-size", "4", "--attacks",
            "apgd-ce", "--batch-size", "4", "--eps", "16/255"]
    assert autoattack.main([*args, "--merge"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "refusing to merge chunks of another evaluation: chunk_000004_000008.pt" in err
    assert "checkpoint_sha256 0000000000000000" in err
    assert not (t.out_dir / f"{NAME}.json").exists()
    for spec, needle in (("3/2", "0 <= i < n"), ("0/0", "n >= 1"), ("a/b", "cannot read")):
        assert autoattack.main([*args, "--shard", spec]) == 1
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, (spec, err)
    assert autoattack.main([*args, "--shard", "0/2", "--merge"]) == 1
    assert "exclude each other" in capsys.readouterr().err
