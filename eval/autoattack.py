"""AutoAttack (Croce & Hein, ICML 2020, arXiv 2003.01690) with the official code (PyPI
`pyautoattack`), in chunks that are saved as they finish, so an interrupted evaluation resumes.

    python -m eval.autoattack runs/cifar100_ikl_at [--weights best] [--n-ex 10000] [--eps 8/255]

Sharded, for job arrays (`--shard i/n` evaluates chunks i, i+n, i+2n, ...; `--merge` combines the
finished chunks into the result JSON once all shards are done), or over the local GPUs:

    python -m eval.autoattack RUN --shard 0/4 ...   # ... and 1/4, 2/4, 3/4, anywhere
    python -m eval.autoattack RUN --merge ...       # same arguments, no --shard
    torchrun --standalone --nproc_per_node=4 -m eval.autoattack RUN ...   # shards + merge

The JSON's `flags` are AutoAttack's own checks (eval.aa_flags), computed from the whole
evaluation; a raised flag is also printed as a warning.

Each attack stage runs on the points that survived the previous stages, in index order and with the
same batching and seeding as AutoAttack's own `run_standard_evaluation` (one call per stage), which
gives the robust accuracy after every stage. pyautoattack's own `state_path` resume is broken
(docs/evaluation.md#autoattack-resume) and is not used.
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from at import checkpoint as ckpt
from at.lock import acquire
from at.target import Target
from errors import USER_ERRORS, report

from . import aa_flags, confidence, randomized
from .aa_chunks import chunk_size_hint, clean_problem, outcome_problem
from .common import (
    DEFAULT_EPS,
    EvalError,
    attack_norm,
    autoattack_norm,
    check_eps,
    check_writable,
    eps_argument,
    known_norm,
    load_test_data,
    parse_eps,
    provenance,
    resolve_batch_size,
    result_name,
    run_command,
    target_from_arguments,
    write_result,
)
from .precision import evaluation_precision, tf32_enabled
from .zoo_target import claim_fields

VERSIONS = ("standard", "plus", "rand")
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
                 device: torch.device, progress: bool = False,
                 draws: int = 0) -> dict[str, torch.Tensor]:
    """Per-example correctness of one chunk: {'clean': bool N, '<attack>': bool N after that
    stage, ...}; the last entry is the AutoAttack robust outcome. `stages` is the version's
    attack list or a sub-list of it (each attack keeps the version's settings). With `draws`
    (a randomised model), also 'draws_correct': int64 N, how many of `draws` forward passes
    classify each final point (adversarial where an attack succeeded) correctly."""
    from pyautoattack import AutoAttack

    assert not model.training, "AutoAttack needs a model in eval mode"
    adversary = AutoAttack(model, version=version, norm=norm, eps=eps, seed=seed, device=device)
    with torch.no_grad():
        correct = torch.cat([model(x[i:i + batch_size].to(device)).argmax(1).cpu()
                             == y[i:i + batch_size] for i in range(0, len(x), batch_size)])
    outcome = {"clean": correct.clone()}
    x_final = x.clone()
    for stage in tqdm(stages, desc="  stages", unit="attack", leave=False, disable=not progress):
        idx = correct.nonzero().flatten()
        if len(idx):
            adversary.attacks_to_run = [stage]
            x_adv, y_adv = adversary.run_standard_evaluation(x[idx], y[idx], batch_size=batch_size)
            _check_perturbation(x_adv, x[idx], eps, norm, stage)
            correct[idx] = y_adv.cpu() == y[idx]
            x_final[idx] = x_adv.cpu()
        outcome[stage] = correct.clone()
    if draws:
        outcome["draws_correct"] = randomized.correct_draws(
            model, x_final, y, batch_size=batch_size, device=device, draws=draws)
    return outcome


def _check_perturbation(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str,
                        stage: str) -> None:
    delta = (x_adv.cpu() - x).flatten(1)
    size = {"linf": lambda: delta.abs().max(1).values, "l2": lambda: delta.norm(dim=1),
            "l1": lambda: delta.abs().sum(1)}[attack_norm(norm)]()
    if size.max() > eps * (1 + 1e-5) + 1e-5 or x_adv.min() < 0 or x_adv.max() > 1:
        raise EvalError(f"{stage} returned points outside the threat model (max size "
                        f"{size.max():.6f} > eps {eps:.6f} or outside [0,1])")


def _load_chunk(path: Path, fingerprint: dict, warn: bool = True) -> dict | None:
    """A finished chunk if its file is intact and belongs to this exact evaluation, else None
    (with a warning, unless `warn` is off: a second look at a chunk already reported)."""
    if not path.exists():
        return None
    try:
        saved = ckpt.load(path)
        ok = saved.get("format") == CHUNK_FORMAT and saved.get("fingerprint") == fingerprint
        outcome = saved["outcome"]
        n = fingerprint["end"] - fingerprint["start"]
        ok = ok and all(v.shape == (n,) and v.dtype == (torch.long if k == "draws_correct"
                                                        else torch.bool)
                        for k, v in outcome.items())
    except (ckpt.CheckpointError, KeyError, AttributeError, TypeError) as err:
        if warn:
            log.warning("chunk file %s is unreadable (%s): recomputing it", path, err)
        return None
    if not ok:
        if warn:
            log.warning("chunk file %s belongs to another evaluation or is malformed: "
                        "recomputing it", path)
        return None
    return saved


def parse_shard(text: str) -> tuple[int, int]:
    """'1/4' -> (1, 4): shard i of n, 0 <= i < n."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise EvalError(f"cannot read --shard {text!r}; write it as i/n, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise EvalError(f"--shard {text}: needs n >= 1 and 0 <= i < n (shards 0/{max(n, 1)} to "
                        f"{max(n, 1) - 1}/{max(n, 1)})")
    return i, n


def _merge_problem(path: Path, saved: dict | None, fingerprint: dict) -> str | None:
    """Why a chunk cannot be merged into this evaluation (None when it can)."""
    if saved is None:
        return "missing"
    theirs = saved.get("fingerprint") or {}
    keys = [k for k in fingerprint if theirs.get(k) != fingerprint[k]]
    if keys:
        what = ", ".join(f"{k} {str(theirs.get(k))[:16]} != {str(fingerprint[k])[:16]}"
                         for k in keys)
        return f"fingerprint differs ({what})"
    return None


@dataclass
class _Plan:
    """One AutoAttack evaluation: what it attacks, how, and where its chunks and result go."""
    t: Target
    version: str
    norm: str  # as AutoAttack and the result spell it (Linf)
    eps_text: str
    eps_value: float
    stages: list[str]  # the attacks run, in order (all of the version's, or a subset)
    full: bool  # all of the version's attacks
    x: torch.Tensor
    y: torch.Tensor
    n_test: int  # images in the whole test set
    seed: int
    batch_size: int
    chunk_size: int
    name: str  # of the result file, its log and its chunk directory
    device: torch.device
    draws: int = 0  # forward passes scoring each final point (the rand version)
    switched: dict | None = None  # standard -> rand for a randomised model, and why

    @property
    def chunk_dir(self) -> Path:
        return self.t.out_dir / f"{self.name}_chunks"

    @property
    def bounds(self) -> list[tuple[int, int]]:
        n = len(self.y)
        return [(s, min(s + self.chunk_size, n)) for s in range(0, n, self.chunk_size)]

    def chunk_path(self, start: int, end: int) -> Path:
        return self.chunk_dir / f"chunk_{start:06d}_{end:06d}.pt"

    def fingerprint(self, start: int, end: int) -> dict:
        """What a saved chunk must match to count for this evaluation."""
        t = self.t
        return {"checkpoint_sha256": t.checkpoint_sha256, "arch": t.arch, "dataset": t.dataset,
                "version": self.version, "norm": self.norm, "eps": self.eps_value,
                "stages": self.stages, "seed": self.seed, "batch_size": self.batch_size,
                "start": start, "end": end, "tf32": tf32_enabled(),
                **({"draws": self.draws} if self.draws else {})}


def evaluate(t: Target, *, n_ex: int | None = None, version: str = "standard",
             norm: str = "Linf", eps: str | None = None, batch_size: int = 500, seed: int = 0,
             chunk_size: int = 1000, attacks: list[str] | None = None,
             progress: bool = True, shard: tuple[int, int] | None = None,
             merge: bool = False) -> dict:
    """Run (or resume) AutoAttack on the first `n_ex` test images of `t`; returns the result
    dict that is also written to <out_dir>/autoattack-<version>_<norm>_eps<eps>_n<images>_
    <weights>.json (`result_name`; autoattack-<version>-<attacks>_... when only some of the
    version's attacks run), with its chunks in the directory of the same name + _chunks.

    shard=(i, n) computes only chunks i, i+n, ... and writes no result (returns a summary of
    the shard); merge=True computes nothing and builds the result from finished chunks, refusing
    chunks of another evaluation and naming the missing ones."""
    stages = _stages(version, norm, attacks)
    if batch_size < 1:
        raise EvalError("--batch-size must be >= 1")
    _check_chunking(chunk_size, shard, merge)
    plan = _plan(t, n_ex, version, norm, eps, batch_size, seed, chunk_size, stages)
    # A randomised defence gets the EOT version, as AutoAttack itself advises when its flag rises.
    switched = None
    if version == "standard" and not attacks:
        flag = randomized.detect(t.model, plan.x, plan.y, plan.device, batch_size)
        if flag["raised"]:
            switched = {"requested": "standard", "ran": "rand", "why": flag["message"],
                        "max_normalized_logit_diff": flag["max_normalized_logit_diff"]}
            log.warning("the model's outputs change between identical forward passes: running "
                        "AutoAttack's rand version (EOT) instead of standard")
            version = "rand"
            plan = _plan(t, n_ex, version, norm, eps, batch_size, seed, chunk_size,
                         _stages(version, norm, None))
    plan.switched = switched
    plan.draws = randomized.DRAWS if plan.version == "rand" else 0
    if merge and not plan.chunk_dir.is_dir():
        raise EvalError(f"nothing to merge: {plan.chunk_dir} does not exist (run the shards "
                        f"first)")
    logfile = _attach_log_file(t.out_dir / (f"{plan.name}.log" if shard is None else
                                            f"{plan.name}_shard{shard[0]}of{shard[1]}.log"))
    plan.chunk_dir.mkdir(parents=True, exist_ok=True)
    log.info("AutoAttack %s %s eps %s on %d %s test images, %s (%s), checkpoint %s", version, norm,
             plan.eps_text, len(plan.y), t.dataset, t.arch, t.weights, t.checkpoint)
    started = time.time()
    if merge:
        _check_mergeable(plan)
    bounds = plan.bounds if shard is None else plan.bounds[shard[0]::shard[1]]
    totals, clean, seconds, reused, draws = _run_chunks(plan, bounds, progress, merge)
    if shard is not None:
        log.info("shard %d/%d: %d chunks done; merge with --merge once every shard is done",
                 *shard, len(bounds))
        logfile.report_failure()
        return {"shard": f"{shard[0]}/{shard[1]}", "chunks": len(bounds), "name": plan.name,
                "chunks_reused": reused, "seconds": round(seconds, 1)}
    result = _result(plan, totals, torch.cat(clean), seconds, reused, started,
                     torch.cat(draws) if draws else None)
    logfile.report_failure()
    return result


def _check_chunking(chunk_size: int, shard: tuple[int, int] | None, merge: bool) -> None:
    if chunk_size < 1:
        raise EvalError("--chunk-size must be >= 1")
    if shard is not None and merge:
        raise EvalError("--shard and --merge exclude each other: merge once all shards are done")


def _check_version(version: str) -> None:
    if version not in VERSIONS:
        raise EvalError(f"unknown AutoAttack version {version!r}; valid: {', '.join(VERSIONS)}")


def _stages(version: str, norm: str, attacks: list[str] | None) -> list[str]:
    """The attacks to run: the version's, or the subset `attacks` of them, in their order."""
    _check_version(version)
    attack_norm(norm)
    full = stage_names(version, norm)
    stages = full if not attacks else [a for a in full if a in attacks]
    if attacks and (set(attacks) - set(full) or not stages):
        raise EvalError(f"--attacks {','.join(attacks)}: {version} {norm} AutoAttack runs "
                        f"{', '.join(full)}; choose among those")
    return stages


def _plan(t: Target, n_ex: int | None, version: str, norm: str, eps: str | None,
          batch_size: int, seed: int, chunk_size: int, stages: list[str]) -> _Plan:
    """Load the images and check the radius; the evaluation's name and settings."""
    threat = attack_norm(norm)
    full = stages == stage_names(version, norm)
    eps_text, eps_value = parse_eps(eps if eps is not None else DEFAULT_EPS[threat])
    check_writable(t.out_dir)  # before any computation
    x, y = load_test_data(t, n_ex)
    check_eps(eps_value, threat, x)
    n_test = len(load_test_data(t, None)[1]) if n_ex is not None else len(y)
    # A subset of the attacks is a screening number, never to be confused with AutoAttack's;
    # another eps, norm or number of images is another result, with its own file and chunks.
    attack = f"autoattack-{version}" if full else f"autoattack-{version}-{'+'.join(stages)}"
    return _Plan(t, version, norm, eps_text, eps_value, stages, full, x, y, n_test,
                 seed, batch_size, chunk_size,
                 result_name(attack, norm, eps_value, len(y), t.weights),
                 next(t.model.parameters()).device)


def _check_mergeable(plan: _Plan) -> None:
    """--merge: every chunk is there, belongs to this evaluation and is whole and consistent
    (eval/aa_chunks.py)."""
    problems = []
    for start, end in plan.bounds:
        path = plan.chunk_path(start, end)
        try:
            saved = ckpt.load(path) if path.exists() else None
            problem = _merge_problem(path, saved, plan.fingerprint(start, end))
        except ckpt.CheckpointError as err:
            problem = f"unreadable ({err})"
        if problem:
            problems.append((path.name, problem))
            continue
        if saved is not None:
            broken = saved.get("format") != CHUNK_FORMAT and "another chunk format" or \
                outcome_problem(saved.get("outcome") or {}, plan.stages, end - start)
            if broken:
                raise EvalError(f"refusing to merge {path}: {broken}; remove it and run its "
                                f"shard again")
    missing = [n for n, p in problems if p == "missing"]
    foreign = [f"{n}: {p}" for n, p in problems if p != "missing"]
    if foreign:
        raise EvalError(f"refusing to merge chunks of another evaluation: {foreign[0]}"
                        + (f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""))
    if missing:
        hint = chunk_size_hint(plan.chunk_dir, {plan.chunk_path(*b).name for b in plan.bounds})
        raise EvalError(f"cannot merge yet: {len(missing)} of {len(plan.bounds)} chunks missing "
                        f"({', '.join(missing)}){hint or '; run the shards that own them'}")


def _run_chunks(plan: _Plan, bounds: list[tuple[int, int]], progress: bool, merge: bool = False
                ) -> tuple[dict[str, int], list[torch.Tensor], float, int, list[torch.Tensor]]:
    """Attack the chunks `bounds` (reusing the finished ones, saving each new one as it ends;
    with `merge` attacking none): correct counts per stage, the clean correctness per chunk,
    attack seconds, chunks reused, and the correct draws per chunk (the rand version; else an
    empty list)."""
    t, x, y, device = plan.t, plan.x, plan.y, plan.device
    totals = {k: 0 for k in ["clean", *plan.stages]}
    seconds, reused, clean_parts, draw_parts = 0.0, 0, [], []
    bar = tqdm(bounds, desc="AutoAttack chunks", unit="chunk", disable=not progress)
    for start, end in bar:
        fingerprint = plan.fingerprint(start, end)
        path = plan.chunk_path(start, end)
        saved = _load_chunk(path, fingerprint)
        if saved is None and merge:  # checked by _check_mergeable; a merge never attacks
            raise EvalError(f"refusing to merge {path}: it is not a chunk of this evaluation")
        if saved is None:  # one process computes a chunk (at/lock.py); it may have just finished
            chunk_lock = acquire(path.with_name(path.name + ".lock"),
                                 f"AutoAttack chunk {path}", "eval.autoattack")
            saved = _load_chunk(path, fingerprint, warn=False)  # finished meanwhile?
            if saved is not None:
                chunk_lock.release()
        was_saved = saved is not None
        if was_saved:  # from disk: refused by name if AutoAttack cannot have written it
            problem = outcome_problem(saved["outcome"], plan.stages, end - start)
            if problem is None and not plan.draws:  # a randomised model's clean pass varies
                problem = clean_problem(t.model, x[start:end], y[start:end],
                                        saved["outcome"]["clean"], plan.batch_size)
            if problem:
                raise EvalError(f"{'refusing to merge' if merge else 'refusing to reuse'} "
                                f"{path}: {problem}; remove it to compute it again")
        if saved is None:
            began = time.time()
            with chunk_lock, torch.random.fork_rng(
                    devices=[device] if device.type == "cuda" else []):
                outcome = attack_chunk(t.model, x[start:end], y[start:end], eps=plan.eps_value,
                                       norm=plan.norm, version=plan.version, stages=plan.stages,
                                       seed=plan.seed, batch_size=plan.batch_size,
                                       device=device, progress=progress, draws=plan.draws)
                saved = {"format": CHUNK_FORMAT, "fingerprint": fingerprint,
                         "outcome": outcome, "seconds": time.time() - began}
                try:
                    ckpt.atomic_save(saved, path)
                except OSError as err:  # a full disk: the chunks saved so far are kept
                    raise EvalError(f"could not write {path} ({err.strerror or err}); the "
                                    f"chunks saved before it are kept: free space and run the "
                                    f"same command again to continue") from None
        reused += was_saved
        clean_parts.append(saved["outcome"]["clean"])
        if plan.draws:
            draw_parts.append(saved["outcome"]["draws_correct"])
        seconds += saved["seconds"]
        for key in totals:
            totals[key] += int(saved["outcome"][key].sum())
        bar.set_postfix(clean=f"{100 * totals['clean'] / end:.2f}",
                        robust=f"{100 * totals[plan.stages[-1]] / end:.2f}")
        log.info("images %d-%d correct: %s%s", start, end, ", ".join(
            f"{k} {int(saved['outcome'][k].sum())}" for k in totals),
            " (finished earlier, reused)" if was_saved else "")
    return totals, clean_parts, seconds, reused, draw_parts


def _result(plan: _Plan, totals: dict[str, int], clean: torch.Tensor, seconds: float,
            reused: int, started: float, draws: torch.Tensor | None = None) -> dict:
    """The result of the whole evaluation, with AutoAttack's flags, 95 % intervals and, for the
    rand version, the accuracy over `draws` (correct draws per point); written to <name>.json."""
    t, n, stages = plan.t, len(plan.y), plan.stages
    stage_results = [{"attack": s, "robust_acc": round(100 * totals[s] / n, 2)} for s in stages]
    flags = aa_flags.compute_flags(t.model, plan.x, plan.y, clean, stage_results,
                                   eps=plan.eps_value, norm=attack_norm(plan.norm),
                                   version=plan.version, batch_size=plan.batch_size,
                                   device=plan.device, seed=plan.seed)
    for flag in aa_flags.raised(flags):
        log.warning("AutoAttack flag %s: %s", flag, flags[flag]["message"])
    for s in stage_results:
        s["ci95"] = confidence.interval(totals[s["attack"]], n)
    robust_k, rand = totals[stages[-1]], None
    if draws is not None:  # the worst case over the draws is the robust accuracy
        robust_k = int((draws == plan.draws).sum())
        rand = {"draws": plan.draws,
                "mean_acc": round(100 * draws.sum().item() / (plan.draws * n), 2),
                "worst_acc": round(100 * robust_k / n, 2),
                "worst_ci95": confidence.interval(robust_k, n),
                "single_forward_acc": round(100 * totals[stages[-1]] / n, 2),
                "why": plan.switched["why"] if plan.switched else "version rand was requested"}
    result = {
        "clean_acc": round(100 * totals["clean"] / n, 2),
        "robust_acc": round(100 * robust_k / n, 2),
        "clean_ci95": confidence.interval(totals["clean"], n),
        "robust_ci95": confidence.interval(robust_k, n),
        "randomized": rand, "version_switched": plan.switched,
        "n_ex": n, "n_test": plan.n_test, "full_test_set": n == plan.n_test,
        "eps": plan.eps_text, "eps_float": plan.eps_value, "norm": plan.norm,
        "version": plan.version if plan.full else "custom", "attacks": stages,
        "stages": stage_results, "flags": flags, "flags_raised": aa_flags.raised(flags),
        "seed": plan.seed, "batch_size": plan.batch_size, "chunk_size": plan.chunk_size,
        "chunks_reused": reused, "seconds": round(seconds, 1),
        "seconds_this_call": round(time.time() - started, 1),
        **provenance(t, plan.device),
    }
    if getattr(t, "claim", None) is not None:  # a RobustBench entry: its leaderboard numbers
        result.update(claim_fields(t.claim, result["clean_ci95"], result["robust_ci95"]))
    path = t.out_dir / f"{plan.name}.json"
    write_result(result, path)
    result["path"] = str(path)
    log.info("clean %.2f%%  AutoAttack %.2f%%  (%s)", result["clean_acc"], result["robust_acc"],
             ", ".join(f"after {s['attack']} {s['robust_acc']:.2f}%" for s in result["stages"]))
    return result


class _LogFile(logging.FileHandler):
    """The evaluation's log file, opened at once (a log that cannot be opened is refused before
    any attack). A record it cannot write (a full disk) gets no traceback of logging's own on
    stderr for each line: the first failure is kept, and `report_failure` says so in one line
    once the result is in."""

    def __init__(self, path: Path):
        super().__init__(path)
        self.failure: BaseException | None = None

    def handleError(self, record: logging.LogRecord) -> None:
        if self.failure is None:
            self.failure = sys.exc_info()[1] or RuntimeError("unknown error")

    def report_failure(self) -> None:
        err = self.failure
        if err is None:
            return
        why = "disk full" if getattr(err, "errno", None) == errno.ENOSPC else \
            getattr(err, "strerror", None) or str(err)
        print(f"eval.autoattack: warning: the log {self.baseFilename} is incomplete: writing "
              f"to it failed ({why}); the result is not affected", file=sys.stderr, flush=True)


def _attach_log_file(path: Path) -> _LogFile:
    """Human-readable log: our chunk summaries plus AutoAttack's own progress lines."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = _LogFile(path)
    except OSError as err:  # its folder took a file (check_writable): the log's own place
        raise EvalError(f"cannot write the AutoAttack log {path} ({err.strerror or err}); the "
                        f"results folder {path.parent} is writable: remove or rename what is "
                        f"at {path.name}") from None
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
    for name, level in (("eval.autoattack", logging.INFO), ("auto-attack", logging.DEBUG)):
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if isinstance(h, logging.FileHandler)]:
            logger.removeHandler(old)
            old.close()
        logger.addHandler(handler)
        logger.setLevel(level)
    return handler


def add_arguments(p: argparse.ArgumentParser) -> None:
    """eval.autoattack's own arguments (besides the target's: eval.common.command_parser)."""
    p.add_argument("--version", default="standard", help="standard | plus | rand")
    p.add_argument("--chunk-size", type=int, default=1000, help="images per saved chunk")
    p.add_argument("--attacks", help="comma-separated subset of the version's attacks, e.g. "
                   "apgd-ce,apgd-t for quick screening (reported as version 'custom')")
    p.add_argument("--shard", help="i/n: evaluate only chunks i, i+n, ... (0 <= i < n) and "
                   "write no result; combine the shards with --merge")
    p.add_argument("--merge", action="store_true",
                   help="build the result from the chunks every shard saved")


def check_arguments(args: argparse.Namespace) -> None:
    """The command line alone, before the target is loaded (eval.arguments: a sweep's too)."""
    norm = known_norm(args)
    if norm is None:  # an rb: target's threat model: its stages are known once it is loaded
        _check_version(args.version)
    else:
        _stages(args.version, autoattack_norm(norm),
                args.attacks.split(",") if args.attacks else None)
    _check_chunking(args.chunk_size, parse_shard(args.shard) if args.shard is not None else None,
                    args.merge)
    eps_argument(args)


def main(argv: list[str] | None = None) -> int:
    def run(args: argparse.Namespace) -> int:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        shard = parse_shard(args.shard) if args.shard is not None else None
        if world > 1 and shard is None and not args.merge:
            return _torchrun(args, world)
        t = target_from_arguments(args)
        r = evaluate(t, n_ex=args.n_ex, version=args.version, norm=args.norm, eps=args.eps,
                     batch_size=resolve_batch_size(args.batch_size, t), seed=args.seed,
                     chunk_size=args.chunk_size,
                     attacks=args.attacks.split(",") if args.attacks else None,
                     progress=sys.stderr.isatty(), shard=shard, merge=args.merge)
        if shard is not None:
            print(f"shard {r['shard']}: {r['chunks']} chunks done ({r['chunks_reused']} "
                  f"reused); merge with --merge once every shard is done")
        else:
            _report(t, r)
        return 0

    return run_command("eval.autoattack", __doc__, argv, add_arguments, run,
                       check=check_arguments)


def _report(t: Target, r: dict) -> None:
    stages = ", ".join(f"{s['attack']} {s['robust_acc']:.2f}" for s in r["stages"])
    print(f"{t.arch} {t.dataset} ({t.weights}): clean {r['clean_acc']:.2f}%  AutoAttack "
          f"{r['version']} {r['norm']} {r['eps']}: {r['robust_acc']:.2f}% on {r['n_ex']} images "
          f"[{stages}]  {r['seconds']:.0f}s -> {r['path']}")
    if r["flags_raised"]:
        print(f"WARNING: AutoAttack flags raised: {', '.join(r['flags_raised'])} (see 'flags' in "
              f"the JSON)")


def _torchrun(args: argparse.Namespace, world: int) -> int:
    """Under torchrun: rank r evaluates shard r/world on local GPU LOCAL_RANK (the CPU when
    there is none), then rank 0 merges once every rank is done (a gloo barrier, which works
    with or without GPUs)."""
    import datetime

    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available() and args.device is None:
        args.device = f"cuda:{local % torch.cuda.device_count()}"
    # AutoAttack on a full test set takes hours: the barrier must outwait the slowest shard.
    dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
    with evaluation_precision(args.allow_tf32):
        return _shards_then_merge(args, world, rank, dist)


def _shards_then_merge(args: argparse.Namespace, world: int, rank: int, dist) -> int:
    status = 0
    try:
        t = target_from_arguments(args)
        common = dict(n_ex=args.n_ex, version=args.version, norm=args.norm, eps=args.eps,
                      batch_size=resolve_batch_size(args.batch_size, t), seed=args.seed,
                      chunk_size=args.chunk_size,
                      attacks=args.attacks.split(",") if args.attacks else None, progress=False)
        evaluate(t, **common, shard=(rank, world))
    except USER_ERRORS as err:
        status = report("eval.autoattack", err, rank)
    failed = torch.tensor([status])
    dist.all_reduce(failed)  # doubles as the barrier
    try:
        if rank == 0 and not int(failed):
            _report(t, evaluate(t, **common, merge=True))
    except USER_ERRORS as err:
        status = report("eval.autoattack", err)
    finally:
        dist.destroy_process_group()
    return status or int(bool(int(failed)))


if __name__ == "__main__":
    sys.exit(main())
