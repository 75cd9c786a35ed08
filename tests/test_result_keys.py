"""Every result is keyed by what defines it (eval/results.py): a later audit or AutoAttack on
fewer images, another eps or quick budgets writes its own file and never replaces the full one;
the readers (eval.plot, eval.summary) use the full-budget result and name it."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from conftest import DIGITS

import models
from at.config import dump_config, load_config
from at.target import load_target
from eval import audit, autoattack, plot, runs_table, summary
from eval.precision import evaluation_precision

TINY = audit.Budget(pgd_steps=2, strong_steps=3, restarts=1, unbounded_steps=3,
                    transfer_steps=3, aa_iters=3, aa_targets=2)


def _run(tmp_path: Path):
    """A run directory (config.yaml) whose eval/ the evaluations write into: an untrained
    digits network, since only where the results go is tested here."""
    torch.manual_seed(0)
    ckpt = tmp_path / "net.pt"
    torch.save(models.build_model("wrn-16-1", 10, dataset="digits").state_dict(), ckpt)
    run = tmp_path / "run"
    run.mkdir()
    dump_config(load_config(DIGITS, [f"out_dir={run}"]), run / "config.yaml")
    t = load_target(ckpt, "best", "wrn-16-1", "digits", device="cpu")
    return run, replace(t, out_dir=run / "eval", weights="best")


@evaluation_precision()
def test_audits_and_autoattack_of_other_settings_keep_their_own_files(tmp_path, capsys):
    run, t = _run(tmp_path)
    small = audit.audit(t, n_ex=6, budget=TINY, batch_size=8)
    first = Path(small["path"])
    assert first.name == "audit-quick_linf_eps8-255_n6_best.json"
    before = first.read_bytes()
    larger = audit.audit(t, n_ex=10, budget=TINY, batch_size=8)
    assert Path(larger["path"]).name == "audit-quick_linf_eps8-255_n10_best.json"
    other_eps = audit.audit(t, n_ex=6, eps="4/255", budget=TINY, batch_size=8)
    assert Path(other_eps["path"]).name == "audit-quick_linf_eps4-255_n6_best.json"
    assert first.read_bytes() == before  # nothing replaced

    # A full-budget audit (its JSON as eval.audit writes it; the full budgets take minutes):
    # on fewer images than the quick one, it is still the one the readers use.
    full = {**json.loads(before), "quick": False, "budget": vars(audit.FULL), "verdict": "warn",
            "sweep": {**small["sweep"], "robust_acc": [50.0] * len(small["sweep"]["eps"])}}
    full_path = run / "eval" / "audit_linf_eps8-255_n6_best.json"
    full_path.write_text(json.dumps(full))
    read = runs_table.read_run(run)
    assert read.audit == "warn"
    assert any("used audit_linf_eps8-255_n6_best.json" in n for n in read.notes), read.notes
    drawn = plot.collect(run, "best")
    assert [s[2] for s in drawn["sweeps"]] == [full["sweep"]["robust_acc"]]
    assert any("used audit_linf_eps8-255_n6_best.json" in n for n in drawn["notes"])

    # AutoAttack on 6 and on 10 images: two files; one point per eps, from the 10 images.
    args = dict(attacks=["apgd-ce"], batch_size=8, chunk_size=8, progress=False)
    six = autoattack.evaluate(t, n_ex=6, **args)
    ten = autoattack.evaluate(t, n_ex=10, **args)
    assert Path(six["path"]).exists() and Path(ten["path"]).exists()
    points = [p for p in plot.collect(run, "best")["points"] if p[0] == "AutoAttack (subset)"]
    assert points == [("AutoAttack (subset)", "Linf", 8 / 255, ten["robust_acc"])]
    assert runs_table.read_run(run).metrics["autoattack"] == ten["robust_acc"]
    # The command lines say which result they used.
    capsys.readouterr()
    assert plot.main([str(run), "--out", str(tmp_path / "fig.png")]) == 0
    assert "used audit_linf_eps8-255_n6_best.json" in capsys.readouterr().err
    assert summary.main([str(run), "--format", "json"]) == 0
    err = capsys.readouterr().err
    assert "AutoAttack: used autoattack-standard-apgd-ce_linf_eps8-255_n10_best.json" in err
