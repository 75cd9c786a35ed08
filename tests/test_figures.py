"""eval.plot and eval.summary: --norm in the configs' spelling, an unknown norm refused, figures in
the format their suffix names, and a copied run counted once."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from conftest import DIGITS

import models
from at.config import dump_config, load_config
from at.target import load_target
from eval import pgd, plot, summary

MAGIC = {"png": b"\x89PNG", "pdf": b"%PDF", "svg": b"<?xml"}


def _one_line(capsys, code, *needles):
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def _run(root: Path, seed: int) -> Path:
    """A finished run on disk as at.train leaves it (config.yaml, best.pt, final.json), with an
    untrained digits network of its seed, and a PGD result in eval/."""
    run = root / f"seed{seed}"
    run.mkdir(parents=True)
    torch.manual_seed(seed)
    net = models.build_model("wrn-16-1", 10, dataset="digits")
    cfg = load_config(DIGITS, [f"out_dir={run}", f"seed={seed}", "model.name=wrn-16-1"])
    dump_config(cfg, run / "config.yaml")
    torch.save({"format": 2, "epoch": 1, "config": cfg, "model": net.state_dict(),
                "metrics": {}}, run / "best.pt")
    (run / "final.json").write_text(json.dumps({"best": {
        "test_clean_acc": 10.0 + seed, "test_robust_acc": 5.0 + seed}}))
    t = replace(load_target(run, "best", device="cpu"), out_dir=run / "eval")
    pgd.evaluate(t, steps=1, n_ex=8, batch_size=8)
    return run


def test_plot_norms_and_figure_formats(tmp_path, capsys):
    run = _run(tmp_path, 0)
    for spelling in ("linf", "Linf", "LINF"):
        out = tmp_path / f"{spelling}.png"
        assert plot.main([str(run), "--norm", spelling, "--out", str(out)]) == 0
        assert out.read_bytes()[:4] == MAGIC["png"]
    _one_line(capsys, plot.main([str(run), "--norm", "L3"]), "unknown norm 'L3'",
              "Linf, L2, L1")
    _one_line(capsys, plot.main([str(run), "--norm", "l2", "--out", str(tmp_path / "x.png")]),
              "no L2 results to plot", "Linf")
    for fmt, magic in MAGIC.items():
        out = tmp_path / f"fig.{fmt}"
        assert plot.main([str(run), "--out", str(out)]) == 0
        assert out.read_bytes()[:len(magic)] == magic, fmt
    _one_line(capsys, plot.main([str(run), "--out", str(tmp_path / "fig.txt")]),
              "fig.txt", ".pdf")
    assert not (tmp_path / "fig.txt").exists()
    assert not list(tmp_path.glob("*.tmp*")) and not list(tmp_path.glob(".*"))


def test_summary_counts_a_copied_run_once_and_plots_in_the_suffix_format(tmp_path, capsys):
    root = tmp_path / "root"
    first, other = _run(root, 0), _run(root, 1)
    copy = root / "seed0_copy"
    shutil.copytree(first, copy)
    capsys.readouterr()
    assert summary.main([str(root), "--format", "json", "--plot", str(tmp_path / "s.pdf")]) == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    (group,) = doc["groups"]
    assert group["n"] == 2 and sorted(group["runs"]) == sorted([str(first), str(other)])
    assert group["test_clean_mean"] == 10.5 and group["test_clean_std"] > 0.5
    assert f"{copy} is a copy of {first}" in captured.err
    assert doc["copies"] and (tmp_path / "s.pdf").read_bytes()[:4] == b"%PDF"
    _one_line(capsys, summary.main([str(root), "--plot", str(tmp_path / "s.doc")]), "s.doc")
