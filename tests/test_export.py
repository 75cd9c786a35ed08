"""Tests for eval/export_robustbench.py: the exported checkpoint loads strictly into RobustBench's
own class built from the exported zoo text and gives our logits; the card has RobustBench's fields
and types; results that are not leaderboard numbers are refused (or, with --allow-partial, flagged
in the footnote). AutoAttack itself is not run: the tests write the JSON eval.autoattack would."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from fake_cifar import write_fake_cifar
from torch import nn

from at.checkpoint import atomic_save, load
from at.config import REPO_ROOT, load_config
from at.target import Target, load_target, sha256
from at.trainer import fit
from eval import export_robustbench as ex
from eval.common import provenance
from eval.robustbench_arch import zoo_namespace
from models import MODELS, build_model

QUICK = ["attack.schedule=fixed", "attack.steps=1", "attack.step_size=8/255", "eval.every=100",
         "eval.final_pgd=false", "log.plot=false", "method.name=standard", "optim.epochs=1",
         "optim.batch_size=32", "data.download=false", "data.val_size=16", "device=cpu"]
CARD_TYPES = {"link": str, "name": str, "authors": str, "additional_data": bool,
              "number_forward_passes": int, "dataset": str, "venue": str, "architecture": str,
              "eps": str, "clean_acc": str, "reported": str, "autoattack_acc": str,
              "unreliable": bool}
NAME = "Smith2026Tiny_WRN-16-1"


def _rb_namespace() -> dict:
    """What robustbench/model_zoo/cifar10.py and cifar100.py import (RobustBench's own classes)."""
    namespace = zoo_namespace()
    if namespace is None:
        pytest.skip("robustbench is not installed")
    return namespace


def _zoo_model(entry_text: str) -> tuple[str, nn.Module]:
    """Evaluate the exported zoo entry exactly as it would sit in the zoo's OrderedDict."""
    (name, spec), = eval(entry_text, dict(_rb_namespace()))
    assert set(spec) == {"model", "gdrive_id"}
    return name, spec["model"]()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """One-epoch runs on fake CIFAR: a ReLU WRN (RobustBench's WideResNet) on CIFAR-10 and a
    swish WRN (DMWideResNet, CIFAR-100 statistics inside) on CIFAR-100."""
    root = tmp_path_factory.mktemp("export_runs")
    runs = {}
    for dataset, arch in (("cifar10", "wrn-16-1"), ("cifar100", "wrn-16-1-swish")):
        write_fake_cifar(str(root / "data"), dataset, n_train=48, n_test=16)
        out = root / dataset
        fit(load_config(REPO_ROOT / "configs" / dataset / "ikl_at.yaml", [
            *QUICK, f"data.name={dataset}", f"data.root={root / 'data'}", f"model.name={arch}",
            f"out_dir={out}"]))
        runs[dataset] = out
    return runs


@pytest.fixture
def run10(trained, tmp_path) -> Path:
    """A private copy, so the AutoAttack JSONs one test writes never leak into another."""
    return Path(shutil.copytree(trained["cifar10"], tmp_path / "run10"))


@pytest.fixture
def run100(trained, tmp_path) -> Path:
    return Path(shutil.copytree(trained["cifar100"], tmp_path / "run100"))


def write_aa(t: Target, name: str | None = None, **changes) -> dict:
    """The result file eval.autoattack writes for `t` (same keys), with `changes` applied, in
    <name>.json (default: the file name of earlier versions, autoattack_<weights>.json)."""
    result = {
        "clean_acc": 61.5, "robust_acc": 30.07, "n_ex": 10000, "n_test": 10000,
        "full_test_set": True, "eps": "8/255", "eps_float": 8 / 255, "norm": "Linf",
        "version": "standard",
        "stages": [{"attack": a, "robust_acc": r} for a, r in
                   (("apgd-ce", 33.1), ("apgd-t", 30.2), ("fab-t", 30.1), ("square", 30.07))],
        "seed": 0, "batch_size": 500, "chunk_size": 1000, "chunks_reused": 0, "seconds": 1.0,
        "seconds_this_call": 1.0, **provenance(t, "cpu"),
    }
    assert result["checkpoint_sha256"] == sha256(t.checkpoint)
    result.update(changes)
    t.out_dir.mkdir(parents=True, exist_ok=True)
    (t.out_dir / f"{name or f'autoattack_{t.weights}'}.json").write_text(json.dumps(result))
    return result


def export(capsys, *args: str) -> tuple[int, str, str]:
    rc = ex.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_card(card: dict) -> None:
    for key, kind in CARD_TYPES.items():
        assert type(card[key]) is kind, (key, card[key])  # bool is not an int here
    assert set(card) - set(CARD_TYPES) <= {"footnote"}
    assert card["number_forward_passes"] == 1 and card["unreliable"] is False
    for key in ("clean_acc", "reported", "autoattack_acc"):
        assert re.fullmatch(r"\d{1,3}\.\d\d", card[key]), (key, card[key])


def assert_clean_state(state: dict) -> None:
    """Plain tensors on the CPU, float32, each with its own storage, no wrapper prefixes."""
    for key, value in state.items():
        assert torch.is_tensor(value) and value.device.type == "cpu", key
        assert value.dtype == (torch.float32 if value.is_floating_point() else torch.int64), key
        assert value.is_contiguous(), key
        assert value.untyped_storage().nbytes() == value.numel() * value.element_size(), key
        assert not key.startswith(("module.", "_orig_mod.")), key


@torch.no_grad()
def assert_same_logits(theirs: nn.Module, ours: nn.Module) -> None:
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ref, out = theirs.eval()(x), ours.eval()(x)
    assert not torch.allclose(ref[0], ref[1])  # non-degenerate
    assert torch.allclose(out, ref, atol=1e-5, rtol=0), (out - ref).abs().max()


def test_wrn_cifar10_export_loads_into_robustbench(run10, tmp_path, capsys):
    t = load_target(run10, device="cpu")
    write_aa(t)
    out = tmp_path / "export"
    rc, stdout, err = export(capsys, run10, "--name", NAME, "--out", out)
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == [f"{NAME}.json", f"{NAME}.pt",
                                                     f"{NAME}_zoo_entry.txt"]
    assert "card fields left empty" in err  # no --paper-link/--paper-title/--authors given

    state = torch.load(out / f"{NAME}.pt", map_location="cpu", weights_only=True)
    assert_clean_state(state)
    entry = (out / f"{NAME}_zoo_entry.txt").read_text()
    assert f"model_info/cifar10/Linf/{NAME}.json" in entry and "`linf`" in entry
    assert "WideResNet(depth=16, widen_factor=1, num_classes=10, sub_block1=False)" in entry
    assert "'gdrive_id': None" in entry
    name, theirs = _zoo_model(entry)
    assert name == NAME and type(theirs).__name__ == "WideResNet"
    assert list(state) == list(theirs.state_dict())  # RobustBench's keys, in its order
    theirs.load_state_dict(state, strict=True)
    assert_same_logits(theirs, t.model)

    card = json.loads((out / f"{NAME}.json").read_text())
    assert_card(card)
    assert "footnote" not in card
    assert card == {"link": "", "name": "", "authors": "", "additional_data": False,
                    "number_forward_passes": 1, "dataset": "cifar10", "venue": "Unpublished",
                    "architecture": "WideResNet-16-1", "eps": "8/255", "clean_acc": "61.50",
                    "reported": "30.07", "autoattack_acc": "30.07", "unreliable": False}


def test_dm_wrn_cifar100_export_with_all_flags(run100, tmp_path, capsys):
    t = load_target(run100, weights="last", device="cpu")
    write_aa(t, clean_acc=65.76, robust_acc=31.9)
    out = tmp_path / "export"
    rc, _, err = export(
        capsys, run100, "--weights", "last", "--name", "Smith2026Tiny_WRN-16-1-swish",
        "--out", out, "--paper-link", "https://arxiv.org/abs/0000.00000",
        "--paper-title", "A Tiny Test", "--authors", "A. Smith, B. Jones", "--venue", "ICLR 2026",
        "--reported", "32.5", "--footnote", "It uses 1M generated images.", "--additional-data",
        "--gdrive-id", "1AbC-dEf_9")
    assert rc == 0, err
    assert err == ""  # a complete card with a conventional name: no warnings

    state = torch.load(out / "Smith2026Tiny_WRN-16-1-swish.pt", weights_only=True)
    assert_clean_state(state)
    assert "mean" not in state and "std" not in state  # non-persistent in DMWideResNet
    entry = (out / "Smith2026Tiny_WRN-16-1-swish_zoo_entry.txt").read_text()
    assert "model_info/cifar100/Linf/Smith2026Tiny_WRN-16-1-swish.json" in entry
    assert "'gdrive_id': '1AbC-dEf_9'" in entry
    _, theirs = _zoo_model(entry)
    assert type(theirs).__name__ == "DMWideResNet"
    ns = _rb_namespace()
    assert torch.equal(theirs.mean, torch.tensor(ns["CIFAR100_MEAN"]).view(3, 1, 1))
    assert torch.equal(theirs.std, torch.tensor(ns["CIFAR100_STD"]).view(3, 1, 1))
    assert isinstance(theirs.relu, nn.SiLU)
    theirs.load_state_dict(state, strict=True)
    assert_same_logits(theirs, t.model)

    card = json.loads((out / "Smith2026Tiny_WRN-16-1-swish.json").read_text())
    assert_card(card)
    assert card == {"link": "https://arxiv.org/abs/0000.00000", "name": "A Tiny Test",
                    "authors": "A. Smith, B. Jones", "additional_data": True,
                    "number_forward_passes": 1, "dataset": "cifar100", "venue": "ICLR 2026",
                    "architecture": "WideResNet-16-1", "eps": "8/255", "clean_acc": "65.76",
                    "reported": "32.50", "autoattack_acc": "31.90", "unreliable": False,
                    "footnote": "It uses 1M generated images."}


def _stale(t: Target) -> None:
    """Evaluate, then change the checkpoint (as a resumed or re-run training would)."""
    write_aa(t)
    saved = load(t.checkpoint)
    saved["model"]["fc.bias"] = saved["model"]["fc.bias"] + 1.0
    atomic_save(saved, t.checkpoint)


@pytest.mark.parametrize("case,setup,expected", [
    ("missing", lambda t: None, "run python -m eval.autoattack"),
    ("stale", _stale, "is stale"),
    ("partial", lambda t: write_aa(t, n_ex=1000, full_test_set=False),
     "ran on 1000 of the 10000 test images"),
    ("subset", lambda t: write_aa(t, n_ex=9999, full_test_set=True), "ran on 9999"),
    ("version", lambda t: write_aa(t, version="rand"), "version 'rand', not 'standard'"),
    ("eps", lambda t: write_aa(t, eps="4/255", eps_float=4 / 255), "eps 4/255 is not the"),
    ("l2_eps", lambda t: write_aa(t, norm="L2"), "eps 8/255 is not the leaderboard's 0.5"),
])
def test_non_leaderboard_results_are_refused(run10, tmp_path, capsys, case, setup, expected):
    setup(load_target(run10, device="cpu"))
    out = tmp_path / "export"
    rc, stdout, err = export(capsys, run10, "--name", NAME, "--out", out)
    assert rc == 1 and stdout == ""
    assert err.startswith("eval.export_robustbench: error: ") and err.count("\n") == 1, err
    assert expected in err
    if case not in ("missing", "stale"):
        assert "--allow-partial" in err  # says how to get past it
    assert not out.exists()  # nothing written, not even the directory


def test_allow_partial_writes_and_says_so(run10, tmp_path, capsys):
    t = load_target(run10, device="cpu")
    write_aa(t, n_ex=1000, full_test_set=False, version="rand", clean_acc=70.0)
    out = tmp_path / "export"
    rc, _, err = export(capsys, run10, "--name", NAME, "--out", out, "--allow-partial",
                        "--footnote", "It uses AutoAugment.")
    assert rc == 0, err
    assert "the card is no leaderboard entry" in err
    card = json.loads((out / f"{NAME}.json").read_text())
    assert_card(card)
    assert card["clean_acc"] == "70.00"
    note = card["footnote"]
    assert note.startswith("It uses AutoAugment. NOT A LEADERBOARD EVALUATION: ")
    assert "1000 of the 10000 test images" in note and "'rand'" in note
    assert (out / f"{NAME}.pt").is_file() and (out / f"{NAME}_zoo_entry.txt").is_file()


def test_the_leaderboard_evaluation_is_exported_whatever_else_was_run(run10, tmp_path, capsys):
    t = load_target(run10, device="cpu")
    full = "autoattack-standard_linf_eps8-255_n10000_best"
    write_aa(t, full)
    # Quick evaluations of the same weights, with better numbers, sit next to it.
    write_aa(t, "autoattack-standard_linf_eps8-255_n1000_best", n_ex=1000, full_test_set=False,
             robust_acc=45.0)
    write_aa(t, "autoattack-standard_linf_eps4-255_n10000_best", eps="4/255",
             eps_float=4 / 255, robust_acc=50.0)
    out = tmp_path / "export"
    rc, stdout, err = export(capsys, run10, "--name", NAME, "--out", out)
    assert rc == 0, err
    assert json.loads((out / f"{NAME}.json").read_text())["autoattack_acc"] == "30.07"
    assert f"{full}.json" in stdout  # says which file it used


@pytest.mark.parametrize("reported", ["200", "-1", "nan"])
def test_reported_accuracy_must_be_a_percentage(run10, tmp_path, capsys, reported):
    write_aa(load_target(run10, device="cpu"))
    out = tmp_path / "export"
    rc, _, err = export(capsys, run10, "--name", NAME, "--out", out, "--reported", reported)
    assert rc == 1 and "[0, 100]" in err and err.count("\n") == 1 and not out.exists()


def test_l2_goes_to_the_l2_folder(run10, tmp_path, capsys):
    write_aa(load_target(run10, device="cpu"), norm="L2", eps="0.5", eps_float=0.5)
    out = tmp_path / "export"
    rc, _, err = export(capsys, run10, "--name", NAME, "--out", out)
    assert rc == 0, err
    entry = (out / f"{NAME}_zoo_entry.txt").read_text()
    assert f"model_info/cifar10/L2/{NAME}.json" in entry and "`l2`" in entry
    assert json.loads((out / f"{NAME}.json").read_text())["eps"] == "0.5"


def _bare(run: Path, folder: Path, prefix: str = "") -> Path:
    """The run's best weights as a plain state_dict file, keys prefixed like a wrapped model."""
    folder.mkdir()
    path = folder / "mine.pt"
    torch.save({prefix + k: v for k, v in load(run / "best.pt")["model"].items()}, path)
    return path


def test_prefixed_bare_checkpoint(run10, tmp_path, capsys):
    path = _bare(run10, tmp_path / "ckpts", prefix="module.")
    t = load_target(path, arch="wrn-16-1", dataset="cifar10", device="cpu")
    assert t.out_dir == tmp_path / "ckpts" / "eval" and t.weights == "mine"
    write_aa(t)
    out = tmp_path / "export"
    rc, _, err = export(capsys, path, "--arch", "wrn-16-1", "--dataset", "cifar10",
                        "--name", NAME, "--out", out)
    assert rc == 0, err
    state = torch.load(out / f"{NAME}.pt", weights_only=True)
    assert_clean_state(state)
    original = load(run10 / "best.pt")["model"]
    assert list(state) == list(original)
    assert all(torch.equal(state[k], original[k]) for k in original)
    _, theirs = _zoo_model((out / f"{NAME}_zoo_entry.txt").read_text())
    theirs.load_state_dict(state, strict=True)
    assert_same_logits(theirs, t.model)


def test_dataset_without_leaderboard(run10, tmp_path, capsys):
    # 10-class weights read as a digits model: a dataset RobustBench has no leaderboard for.
    path = _bare(run10, tmp_path / "ckpts")
    write_aa(load_target(path, arch="wrn-16-1", dataset="digits", device="cpu"),
             n_ex=360, n_test=360)
    out = tmp_path / "export"
    args = [path, "--arch", "wrn-16-1", "--dataset", "digits", "--name", NAME, "--out", out]
    rc, _, err = export(capsys, *args)
    assert rc == 1 and "no digits Linf leaderboard" in err and not out.exists()
    rc, _, err = export(capsys, *args, "--allow-partial")
    assert rc == 0, err
    card = json.loads((out / f"{NAME}.json").read_text())
    assert card["dataset"] == "digits" and "no digits Linf leaderboard" in card["footnote"]


@pytest.mark.parametrize("name", ["Bad Name", "a/b", "../Smith2026Tiny", "x\\y", "", "-lead",
                                  "Smith2026.pt"])
def test_bad_name_refused(run10, tmp_path, capsys, name):
    write_aa(load_target(run10, device="cpu"))
    out = tmp_path / "export"
    rc, _, err = export(capsys, run10, f"--name={name}", "--out", out)
    assert rc == 1 and "is not a RobustBench model name" in err and err.count("\n") == 1
    assert not out.exists()


def test_unconventional_name_only_warns(run10, tmp_path, capsys):
    write_aa(load_target(run10, device="cpu"))
    rc, _, err = export(capsys, run10, "--name", "my_model", "--out", tmp_path / "export")
    assert rc == 0 and "does not follow RobustBench's" in err


def test_architecture_without_robustbench_equivalent(run10, tmp_path, capsys, monkeypatch):
    write_aa(load_target(run10, device="cpu"))
    monkeypatch.delitem(ex.ZOO_CONSTRUCTORS, "wrn-16-1")
    out = tmp_path / "export"
    rc, _, err = export(capsys, run10, "--name", NAME, "--out", out)
    assert rc == 1 and "wrn-16-1 has no RobustBench equivalent" in err and not out.exists()


@pytest.mark.parametrize("arch,wrong,expected", [
    ("wrn-16-1", "WideResNet(depth=16, widen_factor=2, num_classes={C}, sub_block1=False)",
     "does not load into robustbench's"),
    ("wrn-16-1-swish", "DMWideResNet(num_classes={C}, depth=16, width=1, activation_fn=nn.ReLU, "
     "mean={NORM}_MEAN, std={NORM}_STD)", "gives other logits"),
])
def test_wrong_zoo_constructor_is_caught(trained, tmp_path, capsys, monkeypatch, arch, wrong,
                                         expected):
    # The exporter itself checks its zoo text against RobustBench before writing anything.
    run = trained["cifar10" if arch == "wrn-16-1" else "cifar100"]
    run = Path(shutil.copytree(run, tmp_path / "run"))
    write_aa(load_target(run, device="cpu"))
    monkeypatch.setitem(ex.ZOO_CONSTRUCTORS, arch, wrong)
    out = tmp_path / "export"
    rc, _, err = export(capsys, run, "--name", NAME, "--out", out)
    assert rc == 1 and expected in err and not out.exists()


def test_tables_cover_only_our_models():
    assert set(ex.ARCHITECTURE_NAMES) == set(ex.ZOO_CONSTRUCTORS) <= set(MODELS)
    assert ex.ARCHITECTURE_NAMES["wrn-28-10-swish"] == "WideResNet-28-10"
    assert ex.ARCHITECTURE_NAMES["preact-resnet18"] == "PreActResNet-18"


@pytest.mark.parametrize("dataset,num_classes", [("cifar10", 10), ("cifar100", 100)])
@pytest.mark.parametrize("arch", sorted(ex.ZOO_CONSTRUCTORS))
def test_zoo_constructor_keys_and_shapes(arch, dataset, num_classes):
    # Every architecture, WRN-70-16 included: shapes only, on the meta device (no memory).
    norm = dataset.upper() if arch.endswith("-swish") else None
    text = ex.zoo_constructor(arch, num_classes, norm)
    with torch.device("meta"):
        ours = build_model(arch, num_classes, dataset=dataset)
        theirs = eval(text, dict(_rb_namespace()))
    assert {k: v.shape for k, v in theirs.state_dict().items()} == \
        {k: v.shape for k, v in ours.state_dict().items()}


@pytest.mark.parametrize("arch,dataset", [("wrn-16-4", "cifar100"), ("preact-resnet18", "cifar10"),
                                          ("wrn-16-1-swish", "cifar10")])
def test_zoo_constructor_computes_our_model(arch, dataset):
    # The forward pass too (PreActBlockV2 vs PreActBlock, padding, activation, statistics).
    torch.manual_seed(0)
    num_classes = {"cifar10": 10, "cifar100": 100}[dataset]
    ours = build_model(arch, num_classes, dataset=dataset).eval()
    with torch.no_grad():
        for m in ours.modules():  # non-trivial BN statistics, so equal logits mean something
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    text = ex.zoo_constructor(arch, num_classes, ex.norm_statistics(ours))
    theirs = eval(text, dict(_rb_namespace()))
    theirs.load_state_dict(ex.export_state(ours), strict=True)
    assert_same_logits(theirs, ours)


def test_out_onto_an_existing_file_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "export"
    out.write_text("not a directory")
    rc, _, err = export(capsys, tmp_path / "no_such_run", "--name", "Smith2026Tiny", "--out", out)
    assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"--out {out}: {out} is a file" in err  # before the missing run is looked at
    assert out.read_text() == "not a directory"
