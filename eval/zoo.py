"""Audit published RobustBench models: clean accuracy, AutoAttack and the gradient-masking audit
for each zoo entry, next to the leaderboard's claimed numbers (docs/zoo.md).

    python -m eval.zoo cifar10 Linf --names Wong2020Fast,Ding2020MMA --n-ex 1000
    python -m eval.zoo cifar100 Linf --top 5 --n-ex 1000 --data-root data
    python -m eval.zoo cifar10 Linf --all --shard 0/4 ...   # ... 1/4, 2/4, 3/4 anywhere, then
    python -m eval.zoo cifar10 Linf --all --merge ...       # the table from every shard's rows

Checkpoints are read from --model-dir (RobustBench's layout <dataset>/<threat>/<Name>.pt;
downloaded by robustbench where a network exists). Each entry's results go to
<out>/<dataset>_<threat>/<Name>/ (AutoAttack JSON and chunks, audit JSON, and zoo_row_*.json,
the entry's table row); an entry with a row is finished and skipped, an interrupted AutoAttack
resumes from its last saved chunk. The table is written as <out>/<dataset>_<threat>/
zoo_eps<eps>_n<N>.md, .csv and .json. An entry that cannot be evaluated is reported in one line
and the others go on; the exit status is then 1.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import sys
import time
from pathlib import Path

from tqdm import tqdm

from errors import USER_ERRORS, EvalError, report

from . import audit as audit_eval
from . import autoattack as aa_eval
from . import confidence
from . import zoo_target as zt
from .common import DEFAULT_EPS, attack_norm, eps_token, parse_eps, write_result
from .precision import add_tf32_argument, evaluation_precision

ROW_FORMAT = 1
COLUMNS = ("name", "architecture", "claimed_clean", "claimed_aa", "clean", "clean_ci95", "aa",
           "aa_ci95", "aa_minus_claim", "claim_outside_ci", "audit", "audit_warned", "seconds")


def select(dataset: str, threat: str, names: str | None, all_: bool, top: int | None
           ) -> list[str]:
    """The entries to evaluate, in the order given (--names), of the zoo (--all) or of the
    claimed robust accuracy, best first (--top)."""
    if sum(x is not None and x is not False for x in (names, top)) + all_ != 1:
        raise EvalError("say which entries: one of --names A,B, --all or --top K")
    zoo = zt.zoo_names(dataset, threat)
    if names is not None:
        chosen = [n for n in names.split(",") if n]
        for name in chosen:
            zt.check_name(dataset, threat, name)
        return chosen
    if all_:
        return zoo
    if top < 1:
        raise EvalError(f"--top must be >= 1, got {top}")
    claimed = {n: zt.claimed_robust(zt.claim_of(dataset, threat, n)) for n in zoo}
    ranked = sorted((n for n in zoo if claimed[n] is not None), key=lambda n: -claimed[n])
    return ranked[:top]


def _settings(args: argparse.Namespace, eps: float) -> dict:
    """What defines an entry's row: another value is another row (and another table)."""
    return {"format": ROW_FORMAT, "n_ex": args.n_ex, "eps": eps, "seed": args.seed,
            "attacks": args.attacks, "audit_budget": "full" if args.full else "quick",
            "batch_size": args.batch_size}


def evaluate_entry(name: str, args: argparse.Namespace, root: Path, eps_text: str,
                   settings: dict, bar: tqdm | None = None) -> dict:
    """AutoAttack then the audit for one entry; returns (and saves) its table row."""
    t = zt.load_zoo_target(f"rb:{args.dataset}/{args.threat}/{name}", model_dir=args.model_dir,
                           device=args.device, data_root=args.data_root, out=root / name)
    norm = args.threat
    began = time.time()
    if bar is not None:
        bar.set_postfix_str(f"{name}: AutoAttack")
    aa = aa_eval.evaluate(t, n_ex=args.n_ex, version="standard", norm=norm, eps=eps_text,
                          batch_size=args.batch_size, seed=args.seed,
                          chunk_size=args.chunk_size,
                          attacks=args.attacks.split(",") if args.attacks else None,
                          progress=False)
    if bar is not None:
        bar.update(1)
        bar.set_postfix_str(f"{name}: audit")
    logging.getLogger("auto-attack").setLevel(logging.WARNING)
    au = audit_eval.audit(t, n_ex=args.n_ex, eps=eps_text, norm=norm,
                          budget=audit_eval.FULL if args.full else audit_eval.QUICK,
                          batch_size=args.batch_size, seed=args.seed)
    if bar is not None:
        bar.update(1)
    claim = t.claim
    n = aa["n_ex"]
    claimed_aa = zt.claimed_robust(claim)
    row = {
        "name": name, "architecture": t.arch,
        "claimed_clean": claim.get("clean"), "claimed_aa": claimed_aa,
        "claimed_aa_source": "external" if claim.get("external") is not None
        and claim.get("external") == claimed_aa else "autoattack",
        "clean": aa["clean_acc"], "clean_ci95": aa["clean_ci95"],
        "aa": aa["robust_acc"], "aa_ci95": aa["robust_ci95"], "aa_version": aa["version"],
        "randomized": aa["randomized"],
        "aa_minus_claim": None if claimed_aa is None else round(aa["robust_acc"] - claimed_aa, 2),
        "claim_outside_ci": {"clean": confidence.outside(claim.get("clean"), aa["clean_ci95"]),
                             "aa": confidence.outside(claimed_aa, aa["robust_ci95"])},
        "audit": au["verdict"],
        "audit_warned": [c["name"] for c in au["checks"] if c["status"] == "warn"],
        "audit_inconclusive": [c["name"] for c in au["checks"] if c["status"] == "inconclusive"],
        "seconds": round(aa["seconds"] + au["seconds"], 1),
        "seconds_this_call": round(time.time() - began, 1),
        "n_ex": n, "autoattack_json": aa["path"], "audit_json": au["path"],
        "checkpoint_sha256": t.checkpoint_sha256, "settings": settings,
        "claims_commit": zt.claims()["commit"],
    }
    write_result(row, row_path(root, name, settings))
    return row


def row_path(root: Path, name: str, settings: dict) -> Path:
    return root / name / f"zoo_row_eps{eps_token(settings['eps'])}_n{settings['n_ex']}.json"


def finished_row(root: Path, name: str, settings: dict) -> dict | None:
    path = row_path(root, name, settings)
    try:
        row = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return row if isinstance(row, dict) and row.get("settings") == settings else None


def _fmt_ci(value, ci) -> str:
    return "-" if value is None else f"{value:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def _num(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "",
             "| entry | architecture | claimed clean | claimed AA | clean [95% CI] | AA [95% CI] "
             "| AA - claim | audit | warned | seconds |",
             "|---|---|---:|---:|---:|---:|---:|---|---|---:|"]
    for r in rows:
        gap = _num(r["aa_minus_claim"])
        if r["claim_outside_ci"]["aa"]:
            gap += " *"
        lines.append(f"| {r['name']} | {r['architecture']} | {_num(r['claimed_clean'])} | "
                     f"{_num(r['claimed_aa'])} | {_fmt_ci(r['clean'], r['clean_ci95'])} | "
                     f"{_fmt_ci(r['aa'], r['aa_ci95'])}"
                     f"{' (rand)' if r['aa_version'] == 'rand' else ''} | {gap} | {r['audit']} | "
                     f"{', '.join(r['audit_warned']) or '-'} | {r['seconds']:.0f} |")
    lines += ["", "`*`: the claim lies outside the 95 % Clopper-Pearson interval (a significant "
              "gap). Claims: RobustBench model_info at commit "
              f"{zt.claims()['commit'][:12]}."]
    return "\n".join(lines) + "\n"


def csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(COLUMNS)
    for r in rows:
        writer.writerow([r["name"], r["architecture"], r["claimed_clean"], r["claimed_aa"],
                         r["clean"], "-".join(map(str, r["clean_ci95"])), r["aa"],
                         "-".join(map(str, r["aa_ci95"])), r["aa_minus_claim"],
                         r["claim_outside_ci"]["aa"], r["audit"], ";".join(r["audit_warned"]),
                         r["seconds"]])
    return buf.getvalue()


def write_table(rows: list[dict], root: Path, args: argparse.Namespace, eps_text: str,
                settings: dict) -> Path:
    stem = root / f"zoo_eps{eps_token(settings['eps'])}_n{rows[0]['n_ex']}"
    header = (f"RobustBench {args.dataset} {args.threat} eps {eps_text}: {len(rows)} entries on "
              f"{rows[0]['n_ex']} test images, AutoAttack {rows[0]['aa_version']}"
              f"{' (' + args.attacks + ')' if args.attacks else ''}, audit "
              f"{settings['audit_budget']}")
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(markdown(rows, header))
    stem.with_suffix(".csv").write_text(csv_text(rows))
    write_result({"header": header, "rows": rows, "claims_commit": zt.claims()["commit"]},
               stem.with_suffix(".json"))
    return stem.with_suffix(".md")


def run(args: argparse.Namespace) -> int:
    zt.parse(f"rb:{args.dataset}/{args.threat}/-")  # dataset and threat known
    if args.list:
        for name in zt.zoo_names(args.dataset, args.threat):
            c = zt.claim_of(args.dataset, args.threat, name)
            print(f"{name:<55} {c.get('architecture') or '-':<30} clean {_num(c.get('clean'))}"
                  f"  AA {_num(zt.claimed_robust(c))}")
        return 0
    names = select(args.dataset, args.threat, args.names, args.all, args.top)
    eps_text, eps = parse_eps(args.eps or zt.LEADERBOARD_EPS.get((args.dataset, args.threat))
                              or DEFAULT_EPS[attack_norm(args.threat)])
    settings = _settings(args, eps)
    root = Path(args.out) if args.out else Path(args.model_dir).parent / "zoo"
    root = root / f"{args.dataset}_{args.threat}"
    if args.dataset != "imagenet":  # --n-ex beyond the test set: refused before any entry runs
        import data as datasets
        try:
            datasets.load_dataset(args.dataset, "test", root=args.data_root or "data",
                                  n_examples=args.n_ex)
        except ValueError as err:
            raise EvalError(str(err)) from None
    elif args.data_root is None:
        raise EvalError("ImageNet entries are evaluated on RobustBench's 5,000-image subset of the "
                        "validation set: give --data-root (a folder with val/)")
    elif args.n_ex is not None and not 1 <= args.n_ex <= zt.IMAGENET_SUBSET:
        raise EvalError(f"--n-ex must be in [1, {zt.IMAGENET_SUBSET}] for RobustBench's ImageNet "
                        f"subset, got {args.n_ex}")
    shard = aa_eval.parse_shard(args.shard) if args.shard else None
    if shard and args.merge:
        raise EvalError("--shard and --merge exclude each other: merge once all shards are done")
    mine = names[shard[0]::shard[1]] if shard else [] if args.merge else names
    failures = 0
    bar = tqdm(total=2 * len(mine), desc="zoo entries x stages", unit="stage",
               disable=not sys.stderr.isatty() and not args.progress)
    for name in mine:
        if finished_row(root, name, settings) is not None:
            bar.update(2)
            continue
        try:
            evaluate_entry(name, args, root, eps_text, settings, bar)
        except USER_ERRORS as err:
            failures += 1
            report(f"eval.zoo ({name})", err)
            bar.update(2 - (bar.n % 2))
    bar.close()
    if shard:
        print(f"shard {shard[0]}/{shard[1]}: {len(mine)} entries; build the table with --merge "
              f"once every shard is done")
        return 1 if failures else 0
    rows = [finished_row(root, n, settings) for n in names]
    missing = [n for n, r in zip(names, rows) if r is None]
    if args.merge and missing:
        raise EvalError(f"cannot build the table yet: {len(missing)} of {len(names)} entries "
                        f"unfinished ({', '.join(missing[:5])}"
                        f"{', ...' if len(missing) > 5 else ''})")
    rows = [r for r in rows if r is not None]
    if rows:
        path = write_table(rows, root, args, eps_text, settings)
        print(path.read_text(), end="")
        print(f"-> {path} (.csv, .json)")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.zoo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", help="cifar10 | cifar100 | imagenet")
    p.add_argument("threat", help="Linf | L2")
    p.add_argument("--names", help="comma-separated zoo entries")
    p.add_argument("--all", action="store_true", help="every entry of the zoo")
    p.add_argument("--top", type=int, help="the K entries with the best claimed robust accuracy")
    p.add_argument("--list", action="store_true", help="list the zoo's entries and claims")
    p.add_argument("--n-ex", type=int, help="first N test images (default: all)")
    p.add_argument("--eps", help="radius (default: the leaderboard's, 8/255 or 0.5 on CIFAR, "
                   "4/255 on ImageNet)")
    p.add_argument("--model-dir", default="models",
                   help="checkpoints in RobustBench's layout <dataset>/<threat>/<Name>.pt")
    p.add_argument("--out", help="results root (default: <model-dir>/../zoo)")
    p.add_argument("--data-root", help="dataset directory (ImageNet: a folder with val/)")
    p.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--chunk-size", type=int, default=1000, help="AutoAttack images per saved chunk")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attacks", help="a subset of AutoAttack's attacks (screening; reported as "
                   "version 'custom')")
    p.add_argument("--full", action="store_true", help="the audit's full budgets (default: quick)")
    p.add_argument("--shard", help="i/n: evaluate entries i, i+n, ... and write no table")
    p.add_argument("--merge", action="store_true", help="the table from every shard's rows")
    p.add_argument("--progress", action="store_true", help="a progress bar even when not a tty")
    add_tf32_argument(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    # AutoAttack's progress goes to each entry's log file; the console has the progress bar.
    logging.getLogger("eval.autoattack").propagate = False
    try:
        with evaluation_precision(args.allow_tf32):
            return run(args)
    except USER_ERRORS as err:
        return report("eval.zoo", err)


if __name__ == "__main__":
    sys.exit(main())
