"""Package a trained model for a RobustBench submission: the checkpoint, the model_info card and
the model-zoo entry, from a run (or a checkpoint file) and its AutoAttack result.

    python -m eval.autoattack runs/cifar100_ikl_at --weights best
    python -m eval.export_robustbench runs/cifar100_ikl_at --name Cui2023Decoupled_WRN-34-10 \\
        --paper-link https://arxiv.org/abs/2305.13948 --authors "Jiequan Cui, ..." \\
        --paper-title "Decoupled Kullback-Leibler Divergence Loss" --venue "NeurIPS 2024"

writes, in --out (default export/):
    <Name>.pt             plain state_dict with RobustBench's keys (no module./_orig_mod. prefixes)
    <Name>.json           the card, to go to model_info/<dataset>/<Linf|L2>/<Name>.json
    <Name>_zoo_entry.txt  the entry for the linf/l2 dict of robustbench/model_zoo/<dataset>.py

The accuracies come from an AutoAttack result in <run>/eval/ (autoattack-standard_linf_eps8-255_
n10000_<weights>.json; the one used is printed), which must belong to the very checkpoint being
exported (same sha256) and be standard AutoAttack on the full test set at the leaderboard's eps.
--allow-partial exports anything else too, but says so in the card's footnote.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import torch
from torch import nn

import data as datasets
import models
from at import checkpoint as ckpt
from at.checkpoint import write_json, write_text
from at.target import Target, load_target
from errors import USER_ERRORS, report
from models import NORMALIZATION

from .common import EvalError, add_target_arguments, attack_norm, check_writable, parse_eps
from .robustbench_arch import zoo_namespace

# Leaderboards RobustBench keeps for the CIFAR datasets: (dataset, norm) -> eps. CIFAR-100 has
# no L2 leaderboard.
LEADERBOARDS = {("cifar10", "Linf"): "8/255", ("cifar10", "L2"): "0.5",
                ("cifar100", "Linf"): "8/255"}
FULL_TEST_SET = 10_000  # CIFAR-10/100 test images; the leaderboard uses all of them
# RobustBench's threat models (Linf, L2); model_zoo/<ds>.py names the OrderedDict of each as
# attacks/ names the threat model (linf, l2).
ZOO_NORMS = tuple(dict.fromkeys(norm for _, norm in LEADERBOARDS))

# Our model name -> the `architecture` field of the card (what RobustBench's cards write).
ARCHITECTURE_NAMES = {
    "wrn-16-1": "WideResNet-16-1",
    "wrn-16-4": "WideResNet-16-4",
    "wrn-28-10": "WideResNet-28-10",
    "wrn-34-10": "WideResNet-34-10",
    "wrn-16-1-swish": "WideResNet-16-1",
    "wrn-28-10-swish": "WideResNet-28-10",
    "wrn-70-16-swish": "WideResNet-70-16",
    "preact-resnet18": "PreActResNet-18",
}

# Our model name -> the zoo constructor, written with the names model_zoo/cifar10.py and
# cifar100.py import. {C} is the number of classes, {NORM} CIFAR10 or CIFAR100 (the swish models
# normalize inside; RobustBench's DMWideResNet takes the statistics as constructor arguments).
# tests/test_export.py checks that each of these computes what our model computes.
_DM = ("DMWideResNet(num_classes={C}, depth=%d, width=%d, activation_fn=nn.SiLU, "
       "mean={NORM}_MEAN, std={NORM}_STD)")
_WRN = "WideResNet(depth=%d, widen_factor=%d, num_classes={C}, sub_block1=False)"
ZOO_CONSTRUCTORS = {
    "wrn-16-1": _WRN % (16, 1),
    "wrn-16-4": _WRN % (16, 4),
    "wrn-28-10": _WRN % (28, 10),
    "wrn-34-10": _WRN % (34, 10),
    "wrn-16-1-swish": _DM % (16, 1),
    "wrn-28-10-swish": _DM % (28, 10),
    "wrn-70-16-swish": _DM % (70, 16),
    # Projection shortcut fed the pre-activated input: PreActBlockV2, as Rice2020OverfittingNetL2.
    "preact-resnet18": "PreActResNet(PreActBlockV2, [2, 2, 2, 2], num_classes={C}, "
                       "bn_before_fc=True)",
}

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
CONVENTION_RE = re.compile(r"[A-Z][A-Za-z]*\d{4}[A-Z][A-Za-z0-9]*(_[A-Za-z0-9_-]+)?")
# robustbench.utils.load_model strips len(s) characters from any key that CONTAINS these.
RB_STRIPPED = ("module.", "model.")


def check_name(name: str) -> str:
    """A RobustBench model name is also a file name in the zoo: no spaces, no path separators."""
    if not NAME_RE.fullmatch(name):
        raise EvalError(f"--name {name!r} is not a RobustBench model name: use letters, digits, "
                        f"'_' and '-' only, e.g. Cui2023Decoupled_WRN-34-10")
    return name


def norm_statistics(model: nn.Module) -> str | None:
    """'CIFAR10' / 'CIFAR100' for a model that normalizes inside with those statistics, None for
    one that does not normalize (RobustBench feeds [0,1] images to every CIFAR model)."""
    if not hasattr(model, "mean"):
        return None
    for dataset, (mean, std) in NORMALIZATION.items():
        if (torch.allclose(model.mean.flatten().cpu(), torch.tensor(mean))
                and torch.allclose(model.std.flatten().cpu(), torch.tensor(std))):
            return dataset.upper()
    raise EvalError("the model normalizes with statistics that are neither CIFAR-10's nor "
                    "CIFAR-100's; RobustBench's DMWideResNet entry cannot express that")


def check_arch(arch: str) -> str:
    """`arch` itself when RobustBench has the same network (keys and forward)."""
    if arch not in ZOO_CONSTRUCTORS or arch not in ARCHITECTURE_NAMES:
        raise EvalError(f"{arch} has no RobustBench equivalent (exportable: "
                        f"{', '.join(ZOO_CONSTRUCTORS)}); its architecture would first have to be "
                        f"added to robustbench/model_zoo/architectures and to ZOO_CONSTRUCTORS")
    return arch


def zoo_constructor(arch: str, num_classes: int, norm: str | None = None) -> str:
    """The text of RobustBench's constructor for our architecture `arch`."""
    text = ZOO_CONSTRUCTORS[check_arch(arch)]
    if "{NORM}" in text and norm is None:
        raise EvalError(f"{arch} needs its normalization statistics for the zoo entry")
    return text.replace("{C}", str(num_classes)).replace("{NORM}", norm or "")


def _which(t: Target) -> str:
    """The eval.autoattack arguments that select the same weights."""
    if t.run_dir is not None:
        return f"--weights {t.weights}"
    return f"--arch {t.arch} --dataset {t.dataset}"


def _autoattack_results(t: Target, run_aa: str) -> list[dict]:
    """Every AutoAttack result of exactly this checkpoint in its eval directory (each with its
    file under "path"), whatever eps, version or number of images it used."""
    results, stale, unreadable = [], None, None
    for path in sorted(t.out_dir.glob("autoattack*.json")):
        try:
            aa = json.loads(path.read_text())
            float(aa["clean_acc"]), float(aa["robust_acc"]), aa["checkpoint_sha256"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            unreadable = unreadable or f"{path} is not an eval.autoattack result ({err!r})"
            continue
        # Results of other weights of the same run share the directory.
        if aa.get("weights", t.weights) != t.weights:
            continue
        if aa["checkpoint_sha256"] != t.checkpoint_sha256:
            stale = stale or (f"{path} is stale: it evaluated a checkpoint with sha256 "
                              f"{str(aa['checkpoint_sha256'])[:12]}..., but {t.checkpoint} has "
                              f"{t.checkpoint_sha256[:12]}... now")
            continue
        for key in ("arch", "dataset"):
            if aa.get(key, getattr(t, key)) != getattr(t, key):
                raise EvalError(f"{path} evaluated {key} {aa[key]}, not {getattr(t, key)}: "
                                f"{run_aa}")
        for key in ("clean_acc", "robust_acc"):
            if not 0 <= float(aa[key]) <= 100:
                raise EvalError(f"{path}: {key} {aa[key]} is not a percentage in [0, 100]")
        results.append({**aa, "path": str(path)})
    if not results:
        if stale or unreadable:
            raise EvalError(f"{stale or unreadable}: re-{run_aa}")
        raise EvalError(f"no AutoAttack result for these weights (no autoattack*.json of "
                        f"{t.checkpoint} in {t.out_dir}): {run_aa}")
    return results


def read_autoattack(t: Target, target: str) -> dict:
    """The AutoAttack result of exactly this checkpoint to export: the leaderboard evaluation
    (standard version, full test set, the leaderboard's eps) when there is one, else the
    closest to it (fewest problems, then most images)."""
    run_aa = f"run python -m eval.autoattack {target} {_which(t)} first"
    results = _autoattack_results(t, run_aa)
    return min(results, key=lambda aa: (len(leaderboard_problems(aa, t.dataset)),
                                        -int(aa.get("n_ex", 0)), aa["path"]))


def leaderboard_problems(aa: dict, dataset: str) -> list[str]:
    """Why this AutoAttack result is not a leaderboard number (empty when it is one)."""
    norm = aa.get("norm", "Linf")
    problems = []
    if (dataset, norm) not in LEADERBOARDS:
        boards = ", ".join(f"{d} {n}" for d, n in LEADERBOARDS)
        problems.append(f"RobustBench has no {dataset} {norm} leaderboard (it has {boards})")
    else:
        want = LEADERBOARDS[dataset, norm]
        if not math.isclose(parse_eps(str(aa.get("eps")))[1], parse_eps(want)[1], rel_tol=1e-6):
            problems.append(f"eps {aa.get('eps')} is not the leaderboard's {want}")
    n_ex = int(aa.get("n_ex", 0))
    cifar = dataset in ("cifar10", "cifar100")
    if not aa.get("full_test_set", False) or (cifar and n_ex < FULL_TEST_SET):
        problems.append(f"AutoAttack ran on {n_ex} of the {aa.get('n_test', '?')} test images")
    if aa.get("version") != "standard":
        problems.append(f"AutoAttack version {aa.get('version')!r}, not 'standard'")
    return problems


def _pct(value: float) -> str:
    return f"{float(value):.2f}"


def card_eps(aa: dict, dataset: str) -> str:
    """The leaderboard's spelling ("8/255") when the evaluated eps is that value, else the
    evaluated one as eval.autoattack wrote it."""
    board = LEADERBOARDS.get((dataset, aa.get("norm", "Linf")))
    if board and math.isclose(parse_eps(str(aa["eps"]))[1], parse_eps(board)[1], rel_tol=1e-6):
        return board
    return str(aa["eps"])


def model_card(aa: dict, t: Target, args: argparse.Namespace, problems: list[str]) -> dict:
    """The model_info card in the form of RobustBench's curated cards (strings for eps and
    accuracies)."""
    card = {
        "link": args.paper_link or "",
        "name": args.paper_title or "",
        "authors": args.authors or "",
        "additional_data": bool(args.additional_data),
        "number_forward_passes": 1,
        "dataset": t.dataset,
        "venue": args.venue or "Unpublished",
        "architecture": ARCHITECTURE_NAMES[t.arch],
        "eps": card_eps(aa, t.dataset),
        "clean_acc": _pct(aa["clean_acc"]),
        "reported": _pct(args.reported if args.reported is not None else aa["robust_acc"]),
        "autoattack_acc": _pct(aa["robust_acc"]),
        "unreliable": False,
    }
    notes = [args.footnote.strip()] if args.footnote and args.footnote.strip() else []
    if problems:
        # The card lands in a leaderboard folder; the footnote is what the leaderboard shows.
        notes.append("NOT A LEADERBOARD EVALUATION: " + "; ".join(problems) + ".")
    flags = aa.get("flags_raised") or []
    if flags:
        # AutoAttack's own warnings (eval.aa_flags) travel with the number they qualify.
        notes.append("AutoAttack flags raised: " + "; ".join(
            f"{f} ({aa.get('flags', {}).get(f, {}).get('message', 'see the evaluation JSON')})"
            for f in flags) + ".")
    if notes:
        card["footnote"] = " ".join(notes)
    return card


def zoo_entry(name: str, constructor: str, dataset: str, norm: str, gdrive_id: str | None) -> str:
    return (f"# model_info/{dataset}/{norm}/{name}.json holds the card.\n"
            f"# Add to the `{attack_norm(norm)}` OrderedDict of "
            f"robustbench/model_zoo/{dataset}.py:\n"
            f"({name!r}, {{\n"
            f"    'model':\n"
            f"    lambda: {constructor},\n"
            f"    'gdrive_id': {gdrive_id!r}\n"
            f"}}),\n")


def export_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A state_dict that torch.save writes compactly: own storage per tensor (a view would drag
    its whole base storage into the file), float32, on the CPU. Integer buffers
    (num_batches_tracked) keep their dtype, as in RobustBench's checkpoints."""
    out = {}
    for key, value in model.state_dict().items():
        dtype = torch.float32 if value.is_floating_point() else value.dtype
        out[key] = value.detach().to("cpu", dtype).clone(memory_format=torch.contiguous_format)
    return out


@torch.no_grad()
def verify(state: dict[str, torch.Tensor], t: Target, constructor: str) -> bool:
    """Raise unless `state` loads strictly into a fresh model of ours, and into RobustBench's
    own class when robustbench is installed, with the logits of the evaluated model.
    Returns whether RobustBench's class was checked."""
    bad = [k for k in state if any(s in k for s in RB_STRIPPED)]
    if bad:
        raise EvalError(f"key {bad[0]!r} would be mangled by robustbench's load_model")
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    reference = t.model.cpu().float().eval()(x)
    fresh = models.build_model(t.arch, datasets.NUM_CLASSES[t.dataset], dataset=t.dataset)
    candidates = [("our " + t.arch, fresh)]
    namespace = zoo_namespace()
    if namespace is not None:
        # The constructor text is ours (ZOO_CONSTRUCTORS), not user input.
        candidates.append((f"robustbench's {constructor}",
                           eval(constructor, {"__builtins__": {}}, namespace)))
    for what, model in candidates:
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0]
            raise EvalError(f"the exported state_dict does not load into {what}: {first}") from None
        diff = (model.eval()(x) - reference).abs().max().item()
        if not diff <= 1e-4 * max(1.0, reference.abs().max().item()):
            raise EvalError(f"{what} with the exported weights gives other logits than the "
                            f"evaluated model (max difference {diff:.2e})")
    return namespace is not None


def export(args: argparse.Namespace) -> tuple[dict[str, Path], dict, str]:
    """Check everything, then write the three files; returns their paths, the card and the
    AutoAttack result file it holds."""
    name = check_name(args.name)
    out = Path(args.out)
    # Checked before any work, creating nothing: the nearest existing folder must take files.
    there = next(p for p in [out, *out.absolute().parents] if p.exists())
    if not there.is_dir():
        raise EvalError(f"--out {out}: {there} is a file; give the directory the export goes "
                        f"to (default: export)")
    check_writable(there)
    t = load_target(args.target, args.weights, args.arch, args.dataset, device="cpu")
    check_arch(t.arch)
    aa = read_autoattack(t, args.target)
    problems = leaderboard_problems(aa, t.dataset)
    if problems and not args.allow_partial:
        raise EvalError("not a RobustBench leaderboard result: " + "; ".join(problems) +
                        f". Evaluate as the leaderboard does (python -m eval.autoattack "
                        f"{args.target} {_which(t)} with the default --version standard, no "
                        f"--n-ex, --eps 8/255 for Linf or 0.5 for L2), or pass --allow-partial "
                        f"for a card whose footnote says so")
    norm = aa.get("norm", "Linf")
    if norm not in ZOO_NORMS:
        raise EvalError(f"unknown norm {norm!r} in the AutoAttack result; valid: "
                        f"{', '.join(ZOO_NORMS)}")
    constructor = zoo_constructor(t.arch, datasets.NUM_CLASSES[t.dataset],
                                  norm_statistics(t.model))
    card = model_card(aa, t, args, problems)
    state = export_state(t.model)
    checked_rb = verify(state, t, constructor)

    out.mkdir(parents=True, exist_ok=True)
    paths = {"checkpoint": out / f"{name}.pt", "zoo_entry": out / f"{name}_zoo_entry.txt",
             "card": out / f"{name}.json"}
    ckpt.atomic_save(state, paths["checkpoint"])
    write_text(zoo_entry(name, constructor, t.dataset, norm, args.gdrive_id), paths["zoo_entry"])
    write_json(card, paths["card"])  # last: a card only ever sits next to its checkpoint

    if problems:
        print(f"eval.export_robustbench: warning: --allow-partial: the card is no leaderboard "
              f"entry ({'; '.join(problems)}); its footnote says so", file=sys.stderr)
    missing = [k for k in ("link", "name", "authors") if not card[k]]
    if missing:
        print(f"eval.export_robustbench: warning: card fields left empty: {', '.join(missing)} "
              f"(--paper-link / --paper-title / --authors); fill them in before submitting",
              file=sys.stderr)
    if not CONVENTION_RE.fullmatch(name):
        print(f"eval.export_robustbench: warning: {name} does not follow RobustBench's "
              f"<Surname><Year><FirstTitleWord>[_<variant>] naming", file=sys.stderr)
    if not checked_rb:
        print("eval.export_robustbench: warning: robustbench is not installed; the checkpoint "
              "was checked against our model only", file=sys.stderr)
    return paths, card, aa["path"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m eval.export_robustbench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_target_arguments(p, evaluation=False, zoo=False)
    p.add_argument("--name", required=True,
                   help="RobustBench model name, <Surname><Year><FirstTitleWord>[_<variant>]")
    p.add_argument("--out", default="export", help="output directory (default: export)")
    p.add_argument("--paper-link", help="URL of the paper (card: link)")
    p.add_argument("--paper-title", help="title of the paper (card: name)")
    p.add_argument("--authors", help="comma-separated authors")
    p.add_argument("--venue", help="e.g. 'NeurIPS 2024' (default: Unpublished)")
    p.add_argument("--reported", type=float,
                   help="robust accuracy claimed in the paper, percent (default: the measured AA)")
    p.add_argument("--footnote", help="leaderboard footnote, e.g. 'It uses AutoAugment.'")
    p.add_argument("--additional-data", action="store_true",
                   help="trained with extra real data (generated data is not: use --footnote)")
    p.add_argument("--gdrive-id", help="Google Drive file id of the uploaded checkpoint")
    p.add_argument("--allow-partial", action="store_true",
                   help="export a non-leaderboard AutoAttack result (subset, non-standard "
                        "version or eps, other dataset); the footnote says so")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.reported is not None and not 0 <= args.reported <= 100:  # NaN fails too
            raise EvalError(f"--reported must be a percentage in [0, 100], got {args.reported}")
        paths, card, card_source = export(args)
    except USER_ERRORS as err:
        return report("eval.export_robustbench", err)
    print(f"{args.name}: {card['architecture']} {card['dataset']} eps {card['eps']}: clean "
          f"{card['clean_acc']}%  AutoAttack {card['autoattack_acc']}% (from {card_source}) -> "
          f"{', '.join(str(p) for p in paths.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
