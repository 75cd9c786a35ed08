"""AutoAttack (Croce & Hein, ICML 2020, arXiv 2003.01690) with the official code (PyPI
`pyautoattack`), in chunks that are saved as they finish, so an interrupted evaluation resumes.

    python -m eval.autoattack runs/cifar100_ikl_at [--weights best] [--n-ex 10000] [--eps 8/255]

Each attack stage runs on the points that survived the previous stages, in index order and with the
same batching and seeding as AutoAttack's own `run_standard_evaluation` (one call per stage), which
gives the robust accuracy after every stage. pyautoattack's own `state_path` resume is broken
(docs/evaluation.md#autoattack-resume) and is not used.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from at import checkpoint as ckpt
from at.errors import USER_ERRORS, report

from .common import (
    EvalError,
    Target,
    add_target_arguments,
    check_eps,
    load_test_data,
    parse_eps,
    provenance,
    resolve_batch_size,
    result_name,
    target_from_arguments,
    write_json,
)

VERSIONS = ("standard", "plus", "rand")
NORMS = ("Linf", "L2")
CHUNK_FORMAT = 1
log = logging.getLogger("eval.autoattack")
# AutoAttack's per-batch progress goes to the log file only (see _attach_log_file); its warnings
# (randomised or dynamic defence, gradient masking) also reach the console.
_aa_log = logging.getLogger("auto-attack")
_aa_log.propagate = False
if not any(type(h) is logging.StreamHandler for h in _aa_log.handlers):
    _console = logging.StreamHandler()
    _console.setLevel(logging.WARNING)
    _aa_log.addHandler(_console)


def stage_names(version: str, norm: str) -> list[str]:
    """The attacks AutoAttack runs, in order, for a version (as its `_set_version` sets them)."""
    from pyautoattack import AutoAttack
    return list(AutoAttack(torch.nn.Identity(), version=version, norm=norm, eps=0.0).attacks_to_run)


def attack_chunk(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
                 norm: str, version: str, stages: list[str], seed: int, batch_size: int,
                 device: torch.device, progress: bool = False) -> dict[str, torch.Tensor]:
    """Per-example correctness of one chunk: {'clean': bool N, '<attack>': bool N after that
    stage, ...}; the last entry is the AutoAttack robust outcome. `stages` is the version's
    attack list or a sub-list of it (each attack keeps the version's settings)."""
    from pyautoattack import AutoAttack

    assert not model.training, "AutoAttack needs a model in eval mode"
    adversary = AutoAttack(model, version=version, norm=norm, eps=eps, seed=seed, device=device)
    with torch.no_grad():
        correct = torch.cat([model(x[i:i + batch_size].to(device)).argmax(1).cpu()
                             == y[i:i + batch_size] for i in range(0, len(x), batch_size)])
    outcome = {"clean": correct.clone()}
    for stage in tqdm(stages, desc="  stages", unit="attack", leave=False, disable=not progress):
        idx = correct.nonzero().flatten()
        if len(idx):
            adversary.attacks_to_run = [stage]
            x_adv, y_adv = adversary.run_standard_evaluation(x[idx], y[idx], batch_size=batch_size)
            _check_perturbation(x_adv, x[idx], eps, norm, stage)
            correct[idx] = y_adv.cpu() == y[idx]
        outcome[stage] = correct.clone()
    return outcome


def _check_perturbation(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str,
                        stage: str) -> None:
    delta = (x_adv.cpu() - x).flatten(1)
    size = delta.abs().max(1).values if norm == "Linf" else delta.norm(dim=1)
    if size.max() > eps + 1e-5 or x_adv.min() < 0 or x_adv.max() > 1:
        raise EvalError(f"{stage} returned points outside the threat model (max size "
                        f"{size.max():.6f} > eps {eps:.6f} or outside [0,1])")


def _load_chunk(path: Path, fingerprint: dict) -> dict | None:
    """A finished chunk if its file is intact and belongs to this exact evaluation, else None."""
    if not path.exists():
        return None
    try:
        saved = ckpt.load(path)
        ok = saved.get("format") == CHUNK_FORMAT and saved.get("fingerprint") == fingerprint
        outcome = saved["outcome"]
        n = fingerprint["end"] - fingerprint["start"]
        ok = ok and all(v.dtype == torch.bool and v.shape == (n,) for v in outcome.values())
    except (ckpt.CheckpointError, KeyError, AttributeError, TypeError) as err:
        log.warning("chunk file %s is unreadable (%s): recomputing it", path, err)
        return None
    if not ok:
        log.warning("chunk file %s belongs to another evaluation or is malformed: recomputing it",
                    path)
        return None
    return saved


def evaluate(t: Target, *, n_ex: int | None = None, version: str = "standard",
             norm: str = "Linf", eps: str = "8/255", batch_size: int = 500, seed: int = 0,
             chunk_size: int = 1000, attacks: list[str] | None = None,
             progress: bool = True) -> dict:
    """Run (or resume) AutoAttack on the first `n_ex` test images of `t`; returns the result
    dict that is also written to <out_dir>/autoattack-<version>_<norm>_eps<eps>_n<images>_
    <weights>.json (`result_name`; autoattack-<version>-<attacks>_... when only some of the
    version's attacks run), with its chunks in the directory of the same name + _chunks."""
    if version not in VERSIONS:
        raise EvalError(f"unknown AutoAttack version {version!r}; valid: {', '.join(VERSIONS)}")
    if norm not in NORMS:
        raise EvalError(f"unknown norm {norm!r}; valid: {', '.join(NORMS)}")
    full = stage_names(version, norm)
    stages = full if not attacks else [a for a in full if a in attacks]
    if attacks and (set(attacks) - set(full) or not stages):
        raise EvalError(f"--attacks {','.join(attacks)}: {version} {norm} AutoAttack runs "
                        f"{', '.join(full)}; choose among those")
    if batch_size < 1 or chunk_size < 1:
        raise EvalError("--batch-size and --chunk-size must be >= 1")
    eps_text, eps_value = parse_eps(eps)
    x, y = load_test_data(t, n_ex)
    check_eps(eps_value, norm, x)
    n_test = len(load_test_data(t, None)[1]) if n_ex is not None else len(y)
    device = next(t.model.parameters()).device
    # A subset of the attacks is a screening number, never to be confused with AutoAttack's;
    # another eps, norm or number of images is another result, with its own file and chunks.
    attack = f"autoattack-{version}" if stages == full else \
        f"autoattack-{version}-{'+'.join(stages)}"
    name = result_name(attack, norm, eps_value, len(y), t.weights)
    chunk_dir = t.out_dir / f"{name}_chunks"
    chunk_dir.mkdir(parents=True, exist_ok=True)
    _attach_log_file(t.out_dir / f"{name}.log")
    log.info("AutoAttack %s %s eps %s on %d %s test images, %s (%s), checkpoint %s", version, norm,
             eps_text, len(y), t.dataset, t.arch, t.weights, t.checkpoint)

    totals = {k: 0 for k in ["clean", *stages]}
    seconds, reused = 0.0, 0
    started = time.time()
    bounds = [(s, min(s + chunk_size, len(y))) for s in range(0, len(y), chunk_size)]
    bar = tqdm(bounds, desc="AutoAttack chunks", unit="chunk", disable=not progress)
    for start, end in bar:
        fingerprint = {"checkpoint_sha256": t.checkpoint_sha256, "arch": t.arch,
                       "dataset": t.dataset, "version": version, "norm": norm, "eps": eps_value,
                       "stages": stages, "seed": seed, "batch_size": batch_size,
                       "start": start, "end": end}
        path = chunk_dir / f"chunk_{start:06d}_{end:06d}.pt"
        saved = _load_chunk(path, fingerprint)
        was_saved = saved is not None
        if saved is None:
            began = time.time()
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                outcome = attack_chunk(t.model, x[start:end], y[start:end], eps=eps_value,
                                       norm=norm, version=version, stages=stages, seed=seed,
                                       batch_size=batch_size, device=device,
                                       progress=progress)
            saved = {"format": CHUNK_FORMAT, "fingerprint": fingerprint, "outcome": outcome,
                     "seconds": time.time() - began}
            ckpt.atomic_save(saved, path)
        reused += was_saved
        seconds += saved["seconds"]
        for key in totals:
            totals[key] += int(saved["outcome"][key].sum())
        bar.set_postfix(clean=f"{100 * totals['clean'] / end:.2f}",
                        robust=f"{100 * totals[stages[-1]] / end:.2f}")
        log.info("images %d-%d correct: %s%s", start, end, ", ".join(
            f"{k} {int(saved['outcome'][k].sum())}" for k in totals),
            " (finished earlier, reused)" if was_saved else "")

    n = len(y)
    result = {
        "clean_acc": round(100 * totals["clean"] / n, 2),
        "robust_acc": round(100 * totals[stages[-1]] / n, 2),
        "n_ex": n, "n_test": n_test, "full_test_set": n == n_test,
        "eps": eps_text, "eps_float": eps_value, "norm": norm,
        "version": version if stages == full else "custom", "attacks": stages,
        "stages": [{"attack": s, "robust_acc": round(100 * totals[s] / n, 2)} for s in stages],
        "seed": seed, "batch_size": batch_size, "chunk_size": chunk_size,
        "chunks_reused": reused, "seconds": round(seconds, 1),
        "seconds_this_call": round(time.time() - started, 1),
        **provenance(t, device),
    }
    write_json(result, t.out_dir / f"{name}.json")
    result["path"] = str(t.out_dir / f"{name}.json")
    log.info("clean %.2f%%  AutoAttack %.2f%%  (%s)", result["clean_acc"], result["robust_acc"],
             ", ".join(f"after {s['attack']} {s['robust_acc']:.2f}%" for s in result["stages"]))
    return result


def _attach_log_file(path: Path) -> None:
    """Human-readable log: our chunk summaries plus AutoAttack's own progress lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
    for name, level in (("eval.autoattack", logging.INFO), ("auto-attack", logging.DEBUG)):
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if isinstance(h, logging.FileHandler)]:
            logger.removeHandler(old)
            old.close()
        logger.addHandler(handler)
        logger.setLevel(level)



def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.autoattack", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_target_arguments(p)
    p.add_argument("--version", default="standard", help="standard | plus | rand")
    p.add_argument("--chunk-size", type=int, default=1000, help="images per saved chunk")
    p.add_argument("--attacks", help="comma-separated subset of the version's attacks, e.g. "
                   "apgd-ce,apgd-t for quick screening (reported as version 'custom')")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        t = target_from_arguments(args)
        r = evaluate(t, n_ex=args.n_ex, version=args.version, norm=args.norm, eps=args.eps,
                     batch_size=resolve_batch_size(args.batch_size, t), seed=args.seed,
                     chunk_size=args.chunk_size,
                     attacks=args.attacks.split(",") if args.attacks else None,
                     progress=sys.stderr.isatty())
    except USER_ERRORS as err:
        return report("eval.autoattack", err)
    stages = ", ".join(f"{s['attack']} {s['robust_acc']:.2f}" for s in r["stages"])
    print(f"{t.arch} {t.dataset} ({t.weights}): clean {r['clean_acc']:.2f}%  AutoAttack "
          f"{r['version']} {r['norm']} {r['eps']}: {r['robust_acc']:.2f}% on {r['n_ex']} images "
          f"[{stages}]  {r['seconds']:.0f}s -> {r['path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
