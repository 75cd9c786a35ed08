"""Sweeps: many ordinary runs of one base config, over a grid and/or random samples and seeds.

    python -m at.sweep SPEC.yaml             # train every run here, one after another
    python -m at.sweep SPEC.yaml --print     # list the commands instead
    python -m at.sweep SPEC.yaml --slurm     # write a Slurm job-array script (one task per run)

A spec (docs/sweeps.md; example: configs/digits/sweep_beta.yaml):

    base: configs/digits/ikl_at.yaml      # the experiment config every run starts from
    overrides: {optim.epochs: 3}          # dotted keys set in every run
    grid:                                 # every combination of these values
      method.ikl_at.beta: [5, 10, 20]     # a list, {range: [start, stop, step]} (stop included)
      optim.lr: {log_range: [0.01, 0.1, 3]}   # or n values spaced evenly on a log scale
    random:                               # and/or `samples` random draws (seeded: stable)
      samples: 4
      seed: 0
      params: {optim.weight_decay: {log_uniform: [1e-4, 1e-3]}}
    seeds: [0, 1]                         # every point once per seed
    out_root: runs/sweeps/digits_beta     # run directories <out_root>/<name>, e.g. beta5_seed0
    eval: [pgd, autoattack, audit]        # after each run: python -m eval.<name> RUN [args]

Run directory names come from the swept values alone, so they are the same every time the spec is
expanded: a sweep that is killed and started again skips finished runs (final.json and the
evaluations done) and resumes the others (at.train --resume). <out_root>/sweep.json records a hash
of each run; a spec that only adds runs (seeds, grid values) or corrects `reported:` continues
the sweep, and a root that holds runs of another spec is refused unless --resume.

Exit status: 0 every run and evaluation succeeded; 1 a bad spec (one line) or a failed run (the
others still ran); 75 / 130 stopped by SIGTERM / Ctrl-C (start it again to continue).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import itertools
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from errors import (
    EXIT_INTERRUPTED,
    EXIT_PREEMPTED,
    USER_ERRORS,
    ConfigError,
    UserError,
    report,
    unknown,
)

from .checkpoint import atomic_write, write_json
from .config import REPO_ROOT, flatten, load_config, parse_value, read_yaml, sections
from .lock import LOCK_FILE, Lock, acquire

SPEC_FIELDS = ("base", "overrides", "grid", "random", "seeds", "out_root", "eval", "slurm")
RANDOM_FIELDS = ("samples", "seed", "params")
RESERVED = ("out_dir", "seed")  # set by the sweep for every run
EVALS = {"pgd": "eval.pgd", "autoattack": "eval.autoattack", "audit": "eval.audit"}
STATE_FILE = "sweep.json"
EVAL_MARKER = "sweep_evals.json"  # in a run directory: the evaluations the sweep finished there
SIGNIFICANT = 4  # digits kept of a random draw (the directory name shows the exact value)



@dataclass
class Run:
    """One run of the sweep: `overrides` holds the swept values (dotted key -> value)."""
    name: str
    point: str  # the name without the seed: runs of one point differ only in their seed
    seed: int
    overrides: dict[str, Any]
    out_dir: Path
    config: dict = field(repr=False, default_factory=dict)


@dataclass
class Spec:
    path: Path
    base: Path
    overrides: dict[str, Any]
    grid: dict[str, list]
    random: dict | None
    seeds: list[int]
    out_root: Path
    evals: list[tuple[str, list[str]]]
    slurm: dict[str, Any]


# ---- the spec ---------------------------------------------------------------------------------
def _fail(spec: Path, message: str) -> ConfigError:
    return ConfigError(f"{spec}: {message}")


def _check_key(path: Path, key: str, where: str, known: dict[str, Any]) -> None:
    if key in RESERVED:
        raise _fail(path, f"{where} key {key!r} is set by the sweep for every run (use "
                          f"`seeds:` and `out_root:`)")
    if key == "reported" or key.startswith("reported."):
        return  # the published target (at/reported.py) has its own fields
    if key not in known:
        raise _fail(path, str(unknown(f"{where} key", key, known, listed=None, n=2)))


def _grid_values(path: Path, key: str, spec: Any) -> list:
    """A grid entry: a list, {range: [start, stop, step]} or {log_range: [low, high, n]}."""
    if isinstance(spec, list):
        values = spec
    elif isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in ("range",
                                                                             "log_range"):
        kind, args = next(iter(spec.items()))
        if not (isinstance(args, list) and len(args) == 3 and all(
                isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)):
            raise _fail(path, f"grid key {key!r}: {kind} takes three numbers, got {args!r}")
        if kind == "range":
            start, stop, step = args
            if step <= 0:
                raise _fail(path, f"grid key {key!r}: range step must be > 0, got {step}")
            n = math.floor((stop - start) / step + 1e-9) + 1
            exact = all(isinstance(a, int) for a in args)
            # Rounded so that 0.1 + 2 * 0.1 is 0.3 (the directory name and the config agree).
            values = [start + i * step if exact else round(start + i * step, 12)
                      for i in range(max(n, 0))]
        else:
            low, high, n = args
            if low <= 0 or high <= 0 or not isinstance(n, int) or n < 1:
                raise _fail(path, f"grid key {key!r}: log_range needs low, high > 0 and an "
                                  f"integer n >= 1, got {args!r}")
            values = [float(f"{low * (high / low) ** (i / max(n - 1, 1)):.{SIGNIFICANT}g}")
                      for i in range(n)]
    else:
        raise _fail(path, f"grid key {key!r}: give a list of values, {{range: [start, stop, "
                          f"step]}} or {{log_range: [low, high, n]}}, not {spec!r}")
    if not values:
        raise _fail(path, f"grid key {key!r} has no values (empty grid)")
    return values


def _draw(path: Path, key: str, spec: Any, rng: random.Random) -> Any:
    """One random value: a list (choice), {uniform | log_uniform | randint: [low, high]}."""
    if isinstance(spec, list) and spec:
        return rng.choice(spec)
    if isinstance(spec, dict) and len(spec) == 1:
        kind, args = next(iter(spec.items()))
        ok = isinstance(args, list) and len(args) == 2 and all(
            isinstance(a, (int, float)) and not isinstance(a, bool) for a in args) \
            and args[0] <= args[1]
        if kind in ("uniform", "log_uniform", "randint") and ok:
            low, high = args
            if kind == "randint":
                if not all(isinstance(a, int) for a in args):
                    raise _fail(path, f"random key {key!r}: randint takes two integers, got "
                                      f"{args!r}")
                return rng.randint(low, high)
            if kind == "log_uniform":
                if low <= 0:
                    raise _fail(path, f"random key {key!r}: log_uniform needs low > 0")
                value = math.exp(rng.uniform(math.log(low), math.log(high)))
            else:
                value = rng.uniform(low, high)
            return float(f"{value:.{SIGNIFICANT}g}")
    raise _fail(path, f"random key {key!r}: give a non-empty list (choice) or {{uniform | "
                      f"log_uniform | randint: [low, high]}}, not {spec!r}")


def load_spec(path: str | Path, out_root: str | None = None) -> Spec:
    path = Path(path)
    try:
        raw = read_yaml(path)
    except ConfigError as err:
        raise ConfigError(str(err)) from None
    unknown = [str(k) for k in raw if k not in SPEC_FIELDS]
    if unknown:
        raise _fail(path, f"unknown spec field {unknown[0]!r}; fields: {', '.join(SPEC_FIELDS)}")
    if not isinstance(raw.get("base"), str):
        raise _fail(path, "`base:` (the experiment config every run starts from) is required")
    base = Path(raw["base"])
    if not base.is_file():
        raise _fail(path, f"base config not found: {base}")
    base_cfg = load_config(base)
    known = flatten(base_cfg)
    known_sections = sections(known)

    def mapping(name: str) -> dict:
        value = raw.get(name) or {}
        if not isinstance(value, dict):
            raise _fail(path, f"`{name}:` must be a mapping of dotted config keys")
        return {str(k): v for k, v in value.items()}

    overrides = {}
    for key, value in mapping("overrides").items():
        if isinstance(value, dict) and value and (key in known_sections or key == "reported"):
            # `optim: {lr: 0.2}` is `optim.lr: 0.2` (a mapping never replaces a section)
            overrides.update(flatten(value, prefix=f"{key}."))
        else:
            overrides[key] = value
    for key in overrides:
        _check_key(path, key, "overrides", known)
    grid_raw = mapping("grid")
    if "grid" in raw and not grid_raw:
        raise _fail(path, "empty grid (`grid:` names no keys)")
    grid = {}
    for key, values in grid_raw.items():
        if key in known_sections:
            raise _fail(path, f"grid key {key!r} is a section; sweep its entries")
        _check_key(path, key, "grid", known)
        grid[key] = [parse_value(v, key) for v in _grid_values(path, key, values)]
    rnd = None
    if raw.get("random") is not None:
        rnd = raw["random"]
        if not isinstance(rnd, dict) or set(rnd) - set(RANDOM_FIELDS):
            bad = sorted(set(rnd) - set(RANDOM_FIELDS)) if isinstance(rnd, dict) else [rnd]
            raise _fail(path, f"random: unknown field {bad[0]!r}; fields: "
                              f"{', '.join(RANDOM_FIELDS)}")
        samples, params = rnd.get("samples"), rnd.get("params") or {}
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise _fail(path, f"random.samples must be an integer >= 1, got {samples!r}")
        if not isinstance(params, dict) or not params:
            raise _fail(path, "random.params names no keys (empty random search)")
        for key in params:
            _check_key(path, key, "random", known)
            if key in grid:
                raise _fail(path, f"key {key!r} is both in grid and in random")
        seed = rnd.get("seed") or 0
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise _fail(path, f"random.seed must be an integer, got {seed!r}")
        rnd = {"samples": samples, "seed": seed,
               "params": {str(k): v for k, v in params.items()}}
    for key in overrides:
        if key in grid or (rnd and key in rnd["params"]):
            raise _fail(path, f"key {key!r} is both in overrides and swept")
    seeds = raw.get("seeds")
    if seeds is None:
        seeds = [base_cfg["seed"]]
    elif isinstance(seeds, int) and not isinstance(seeds, bool) and seeds >= 1:
        seeds = list(range(seeds))  # `seeds: 3` = 0, 1, 2
    if not (isinstance(seeds, list) and seeds and all(
            isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise _fail(path, f"seeds must be a non-empty list of integers (or a count), got "
                          f"{raw.get('seeds')!r}")
    if len(set(seeds)) != len(seeds):
        raise _fail(path, f"seeds repeat a value: {seeds}")
    root = out_root or raw.get("out_root")
    if not isinstance(root, str) or not root:
        raise _fail(path, "`out_root:` (the directory that holds the runs) is required")
    evals = []
    for item in raw.get("eval") or []:
        name, args = (item, []) if isinstance(item, str) else (
            next(iter(item.items())) if isinstance(item, dict) and len(item) == 1 else (None, []))
        if name not in EVALS:
            raise _fail(path, f"unknown evaluation {name if name else item!r}; known: "
                              f"{', '.join(EVALS)} (a name, or name: [arguments])")
        if isinstance(args, str):
            args = shlex.split(args)
        if not isinstance(args, list):
            raise _fail(path, f"eval {name}: arguments must be a list or a string")
        evals.append((name, [str(a) for a in args]))
    slurm = raw.get("slurm") or {}
    if not isinstance(slurm, dict):
        raise _fail(path, "`slurm:` must be a mapping of sbatch options (e.g. time: 48:00:00)")
    for key, value in slurm.items():
        _check_slurm(path, key, value)
    return Spec(path, base, {k: parse_value(v, k) for k, v in overrides.items()}, grid, rnd,
                seeds, Path(root), evals, slurm)


# sbatch options that take no value (`requeue: null` writes `#SBATCH --requeue`).
SLURM_FLAGS = ("requeue", "no-requeue", "exclusive", "overcommit", "contiguous", "hold",
               "no-kill", "oversubscribe", "spread-job", "use-min-nodes")


def _check_slurm(path: Path, key: Any, value: Any) -> None:
    """One `slurm:` option that makes one valid `#SBATCH --key=value` line."""
    if not (isinstance(key, str) and re.fullmatch(r"[a-z][a-z0-9-]*", key)):
        raise _fail(path, f"slurm: option {key!r} is not an sbatch option name (e.g. time, "
                          f"mem, partition)")
    if value is None:
        if key not in SLURM_FLAGS:
            raise _fail(path, f"slurm.{key} has no value; only the flags "
                              f"{', '.join(SLURM_FLAGS)} take none")
        return
    if isinstance(value, (bool, list, dict)) or not isinstance(value, (str, int, float)):
        raise _fail(path, f"slurm.{key} must be one string or number, got {value!r}")
    if isinstance(value, str) and (not value.strip() or re.search(r"[\n\r]", value)):
        raise _fail(path, f"slurm.{key} must be one non-empty line, got {value!r}")


# ---- points, names, configs -------------------------------------------------------------------
def override_text(key: str, value: Any) -> str:
    """`key=value` that at.train's override parser reads back as exactly `value`."""
    if isinstance(value, str):
        text = value if yaml.safe_load(value) == value and value.strip() == value else \
            json.dumps(value)
    else:
        text = json.dumps(value)  # JSON is YAML; floats keep their shortest exact repr
    return f"{key}={text}"


def _labels(keys: list[str]) -> dict[str, str]:
    """The shortest dotted suffix of each key that no other swept key shares."""
    labels = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            label = ".".join(parts[-n:])
            if not any(o != key and (o == label or o.endswith("." + label)) for o in keys):
                break
        labels[key] = label
    return labels


def _value_text(value: Any) -> str:
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, float):
        text = f"{value:.6g}"
    elif isinstance(value, (list, tuple)):
        text = "-".join(_value_text(v) for v in value)
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9.+-]", "-", text)


REDRAWS = 100  # draws of one sample before a search is declared too narrow for its samples


def _samples(spec: Spec) -> list[dict]:
    """`samples` distinct random points (seeded: the same every time). A draw equal to an
    earlier one (a narrow choice list, a randint range, rounding) is drawn again."""
    rng = random.Random(spec.random["seed"])
    samples: list[dict] = []
    for i in range(spec.random["samples"]):
        for _ in range(REDRAWS):
            sample = {k: parse_value(_draw(spec.path, k, v, rng), k)
                      for k, v in spec.random["params"].items()}
            if sample not in samples:
                break
        else:
            raise _fail(spec.path, f"random: {spec.random['samples']} samples asked, but "
                                   f"after {REDRAWS} draws sample {i + 1} still repeats one of "
                                   f"the first {i}: the search space has too few points")
        samples.append(sample)
    return samples


def expand(spec: Spec) -> list[Run]:
    """Every run of the spec, in order (grid points, then random samples, then seeds)."""
    keys = list(spec.grid)
    grid_points = [dict(zip(keys, values)) for values in itertools.product(
        *(spec.grid[k] for k in keys))] or [{}]
    samples = [{}]
    if spec.random:
        samples = _samples(spec)
    labels = _labels(keys + (list(spec.random["params"]) if spec.random else []))
    runs, seen = [], {}
    for point in grid_points:
        for sample in samples:
            swept = {**point, **sample}
            name = "_".join(f"{labels[k]}{_value_text(v)}" for k, v in swept.items())
            if name in seen and seen[name] != swept:
                raise _fail(spec.path, f"sweep points {seen[name]} and {swept} map to the same "
                                       f"directory name {name!r}")
            if name in seen:
                raise _fail(spec.path, f"sweep point {swept} appears twice (directory name "
                                       f"{name!r})")
            seen[name] = swept
            for seed in spec.seeds:
                full = f"{name}_seed{seed}" if name else f"seed{seed}"
                runs.append(Run(full, name or "seed", seed, swept, spec.out_root / full))
    for run in runs:
        try:
            run.config = load_config(spec.base, train_args(spec, run))
        except UserError as err:  # every run checked before the first one starts
            raise _fail(spec.path, f"run {run.name}: {err}") from None
    return runs


def train_args(spec: Spec, run: Run) -> list[str]:
    """The dotted overrides of one run (after `-c base`)."""
    return [*(override_text(k, v) for k, v in spec.overrides.items()),
            *(override_text(k, v) for k, v in run.overrides.items()),
            f"seed={run.seed}", override_text("out_dir", str(run.out_dir))]


def train_command(spec: Spec, run: Run, resume: bool = False) -> list[str]:
    return [sys.executable, "-m", "at.train", "-c", str(spec.base), *train_args(spec, run),
            *(["--resume"] if resume else [])]


def eval_commands(spec: Spec, run: Run) -> list[list[str]]:
    return [[sys.executable, "-m", EVALS[name], str(run.out_dir), *args]
            for name, args in spec.evals]


def spec_hash(runs: list[Run]) -> str:
    """A hash of what the runs train (resolved configs without out_dir): two specs that train
    the same runs under the same names share it, whatever their text."""
    doc = [[r.name, {k: v for k, v in r.config.items() if k != "out_dir"}] for r in runs]
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---- the sweep root ---------------------------------------------------------------------------
def run_hash(run: Run) -> str:
    """A hash of what one run trains: its resolved config without out_dir and without the
    `reported:` target (a corrected target changes no run)."""
    doc = {k: v for k, v in run.config.items() if k not in ("out_dir", "reported")}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _conflict(state: dict, runs: list[Run]) -> str | None:
    """Why the root's recorded runs are not a subset of this spec's (None when this spec only
    adds runs: more seeds, more grid values, a corrected `reported:` target)."""
    mine = {r.name: run_hash(r) for r in runs}
    if isinstance(state.get("run_hashes"), dict):
        other = [n for n, h in state["run_hashes"].items() if mine.get(n) != h]
        return None if not other else state["hash"]
    # A sweep.json without per-run hashes: its spec hash over the runs it names.
    known = state.get("runs")
    if isinstance(known, list) and set(known) <= set(mine) and \
            spec_hash([r for r in runs if r.name in set(known)]) == state["hash"]:
        return None
    return state["hash"]


def check_root(spec: Spec, runs: list[Run], resume: bool) -> dict:
    """Refuse a root holding runs of another spec (unless `resume`); a spec that only adds runs
    to the recorded ones continues there. Returns the state to record once every other check
    passed (`write_state`): a refused command changes nothing."""
    root, digest = spec.out_root, spec_hash(runs)
    state_path = root / STATE_FILE
    if root.exists() and not root.is_dir():
        raise ConfigError(f"out_root {root} is a file, not a directory")
    previous = None
    if state_path.is_file():
        try:
            state = json.loads(state_path.read_text())
            state["hash"]
            previous = _conflict(state, runs)
        except (OSError, ValueError, KeyError, TypeError):
            raise ConfigError(f"{state_path} is unreadable; remove it to start the sweep "
                             f"again there (the runs are kept)") from None
    elif root.is_dir():
        strangers = sorted(p.name for p in root.iterdir() if (p / "config.yaml").is_file())
        if strangers:
            previous = f"no spec (runs {', '.join(strangers[:3])})"
    if previous is not None and previous != digest and not resume:
        raise ConfigError(f"out_root {root} holds runs of another spec ({previous}, this spec: "
                         f"{digest}); pass --resume to continue there anyway, or choose "
                         f"another out_root")
    return {"hash": digest, "spec": str(spec.path), "base": str(spec.base),
            "runs": [r.name for r in runs], "run_hashes": {r.name: run_hash(r) for r in runs},
            "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def write_state(root: Path, state: dict) -> None:
    write_json(state, root / STATE_FILE)


def _run_dir_above(root: Path) -> Path | None:
    """The run directory that `root` is or lies inside, if any."""
    for path in [root, *root.absolute().parents]:
        if (path / "config.yaml").is_file() and any(
                (path / name).exists() for name in ("metrics.jsonl", "last.pt", "final.json")):
            return path
    return None


def claim_root(root: Path) -> Lock:
    """The sweep root for this process alone: a second sweep on it is refused, naming this one
    (the runs themselves are locked by at.train)."""
    if root.exists() and not root.is_dir():
        raise ConfigError(f"out_root {root} is a file, not a directory")
    run = _run_dir_above(root)
    if run is not None:  # its runs would land among a run's files (and its summary pool them)
        raise ConfigError(f"out_root {root} is inside the run directory {run}; choose an "
                         f"out_root outside any run")
    try:
        root.mkdir(parents=True, exist_ok=True)
        return acquire(root / LOCK_FILE, f"out_root {root}", "at.sweep")
    except OSError as err:
        raise ConfigError(f"cannot write to out_root {root} ({err.strerror or err}); choose "
                         f"another out_root") from None


def run_state(run: Run) -> str:
    """done (final.json written) | resume (the directory holds a started run) | new."""
    if (run.out_dir / "final.json").is_file():
        return "done"
    if run.out_dir.is_dir() and any(run.out_dir.iterdir()):
        return "resume"
    return "new"


def _check_done_run(spec: Spec, run: Run) -> None:
    """A finished run in place of one of ours must have trained what the spec says (its
    `reported:` target may differ: see `update_reported`)."""
    try:
        saved = flatten(yaml.safe_load((run.out_dir / "config.yaml").read_text()) or {})
    except (OSError, yaml.YAMLError):
        raise ConfigError(f"{run.out_dir}/config.yaml is unreadable") from None
    want = flatten(run.config)
    for key in [*spec.overrides, *run.overrides, "seed"]:
        if key == "reported" or key.startswith("reported."):
            continue
        if key in want and saved.get(key) != want[key]:
            raise ConfigError(f"{run.out_dir} holds a run with {key}={saved.get(key)!r}, not "
                             f"{want[key]!r}: another spec's run; remove it or choose another "
                             f"out_root")


def update_reported(run: Run) -> bool:
    """A finished run's config.yaml gets the spec's `reported:` target when the spec corrected
    it (the target describes the run, it changed nothing in it; at.train --resume does the same
    for a run that is not finished). Whether it changed."""
    path = run.out_dir / "config.yaml"
    doc = yaml.safe_load(path.read_text()) or {}
    if doc.get("reported") == run.config.get("reported"):
        return False
    doc["reported"] = run.config.get("reported")
    text = yaml.safe_dump(doc, sort_keys=False)
    atomic_write(path, lambda f: f.write(text.encode()))
    return True


def _check_evals(spec: Spec) -> None:
    missing = [n for n, _ in spec.evals if importlib.util.find_spec(EVALS[n]) is None]
    if missing:
        raise ConfigError(f"eval {missing[0]!r} needs python -m {EVALS[missing[0]]}, which "
                         f"this checkout does not have")


def check_eval_arguments(spec: Spec) -> None:
    """Each `eval:` command line as its command reads it (its own parser and argument checks,
    through python -m eval.arguments: eval/ sits above at/), before anything is written, so
    that a typo is not found after the first run has trained."""
    _check_evals(spec)
    if not spec.evals:
        return
    commands = json.dumps([[EVALS[name], args] for name, args in spec.evals])
    proc = subprocess.run([sys.executable, "-m", "eval.arguments", commands], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600)
    try:
        problems = json.loads(proc.stdout)
    except ValueError:
        problems = None
    if not (isinstance(problems, list) and len(problems) == len(spec.evals)):
        lines = proc.stderr.strip().splitlines() or ["(no message)"]
        raise _fail(spec.path, f"the eval: arguments could not be checked (python -m "
                               f"eval.arguments exited {proc.returncode}: {lines[-1]})") from None
    for (name, _), problem in zip(spec.evals, problems):
        if problem:
            raise _fail(spec.path, f"eval {name}: {problem}")


def _evals_done(run: Run) -> dict:
    try:
        return json.loads((run.out_dir / EVAL_MARKER).read_text())
    except (OSError, ValueError):
        return {}


def _eval_key(cmd: list[str]) -> str:
    return shlex.join(cmd[1:])  # without the interpreter's path: a moved venv is the same eval


# ---- running ----------------------------------------------------------------------------------
class _Child:
    """The one subprocess a local sweep runs at a time; SIGTERM is passed on to it so that a
    training run saves last.pt before the sweep stops."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.signal: int | None = None

    def __call__(self, signum, frame) -> None:
        self.signal = signum
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signum)

    def run(self, cmd: list[str]) -> int:
        self.proc = subprocess.Popen(cmd)
        try:
            while True:
                try:
                    return self.proc.wait()
                except KeyboardInterrupt:  # the child got the same Ctrl-C: wait for its save
                    self.signal = signal.SIGINT
        finally:
            self.proc = None


def run_local(spec: Spec, runs: list[Run]) -> int:
    _check_evals(spec)
    child = _Child()
    previous = signal.signal(signal.SIGTERM, child)
    failed = []
    try:
        for i, run in enumerate(runs, 1):
            state = run_state(run)
            tag = f"at.sweep: [{i}/{len(runs)}] {run.name}"
            if state == "done":
                _check_done_run(spec, run)
                print(f"{tag}: finished, skipped", flush=True)
            else:
                print(f"{tag}: {'resuming' if state == 'resume' else 'training'}", flush=True)
                rc = child.run(train_command(spec, run, resume=state == "resume"))
                if rc in (EXIT_PREEMPTED, EXIT_INTERRUPTED) or child.signal is not None:
                    print(f"at.sweep: stopped during {run.name}; run the same command again "
                          f"to continue", file=sys.stderr)
                    return EXIT_INTERRUPTED if child.signal == signal.SIGINT or \
                        rc == EXIT_INTERRUPTED else EXIT_PREEMPTED
                if rc != 0:
                    print(f"{tag}: at.train failed (exit status {rc}); going on with the "
                          f"next run", file=sys.stderr)
                    failed.append(run.name)
                    continue
            done = _evals_done(run)
            for cmd in eval_commands(spec, run):
                key = _eval_key(cmd)
                if key in done:
                    continue
                print(f"{tag}: {shlex.join(cmd[1:])}", flush=True)
                rc = child.run(cmd)
                if child.signal is not None:
                    return EXIT_INTERRUPTED if child.signal == signal.SIGINT else EXIT_PREEMPTED
                if rc != 0:
                    print(f"{tag}: {cmd[2]} failed (exit status {rc})", file=sys.stderr)
                    failed.append(f"{run.name} ({cmd[2]})")
                    continue
                done[key] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                text = json.dumps(done, indent=2) + "\n"
                atomic_write(run.out_dir / EVAL_MARKER, lambda f: f.write(text.encode()))
    finally:
        signal.signal(signal.SIGTERM, previous)
    if failed:
        print(f"at.sweep: {len(failed)} failed: {', '.join(failed)}; the others are done. "
              f"Fix the cause and run the sweep again", file=sys.stderr)
        return 1
    print(f"at.sweep: all {len(runs)} runs done in {spec.out_root}; summary: "
          f"python -m eval.summary {spec.out_root}", flush=True)
    return 0


def print_commands(spec: Spec, runs: list[Run]) -> None:
    for run in runs:
        state = run_state(run)
        prefix = "# done: " if state == "done" else ""
        cmd = train_command(spec, run, resume=state == "resume")
        print(prefix + shlex.join(["python", *cmd[1:]]))
        done = _evals_done(run)
        for ev in eval_commands(spec, run):
            print(("# done: " if _eval_key(ev) in done else "") + shlex.join(["python", *ev[1:]]))


def slurm_script(spec: Spec, runs: list[Run]) -> str:
    """A job array: task i trains runs[i] through sh/slurm_lib.sh (requeueing only itself when
    a signal stops it), then runs the spec's evaluations through at.sweep --eval-only. Paths are
    absolute, so that it may be submitted from anywhere (docs/scale.md#preemption-and-slurm)."""
    spec = replace(spec, path=spec.path.resolve(), base=spec.base.resolve(),
                   out_root=spec.out_root.resolve())
    runs = [replace(r, out_dir=r.out_dir.resolve()) for r in runs]
    options = {"job-name": f"sweep-{spec.out_root.name}", "array": f"0-{len(runs) - 1}",
               "ntasks-per-node": 1, "cpus-per-task": 16, "time": "48:00:00",
               "signal": "B:TERM@300", "requeue": None, "open-mode": "append",
               "output": f"{spec.out_root}/slurm-%A_%a.out", **spec.slurm}
    lines = ["#!/usr/bin/env bash",
             f"# Written by `python -m at.sweep {spec.path} --slurm`: one array task per run of",
             f"# the sweep in {spec.out_root}. Submit with: sbatch {spec.out_root}/sweep.sbatch",
             "# A task stopped by a signal requeues only itself and continues its run; a finished",
             "# run is not trained again, and finished evaluations are not repeated."]
    lines += [f"#SBATCH --{k}" if v is None else f"#SBATCH --{k}={v}" for k, v in options.items()]
    root = shlex.quote(str(spec.out_root))
    lines += ["set -uo pipefail",
              f"source {shlex.quote(str(REPO_ROOT / 'sh' / 'slurm_lib.sh'))} || exit 1",
              # A root the compute node does not see: stop before training somewhere unseen.
              f"[ -d {root} ] || slurm_fail \"the sweep root {spec.out_root} does not exist on "
              f"node $(hostname): out_root must be on a filesystem every node sees\"",
              f"slurm_setup {shlex.quote(str(REPO_ROOT))}",
              'task="${SLURM_ARRAY_TASK_ID:?submit this script with sbatch (a job array)}"',
              'case "$task" in']
    for i, run in enumerate(runs):
        args = shlex.join(train_args(spec, run))
        lines.append(f"  {i}) name={shlex.quote(run.name)}; args=({args}) ;;")
    lines += ['  *) slurm_fail "no run for array task $task" ;;', "esac",
              f'out_dir={root}/"$name"',
              'if [ ! -f "$out_dir/final.json" ]; then',
              f'  slurm_train {shlex.quote(str(spec.base))} "${{args[@]}}" || exit $?',
              "fi"]
    if spec.evals:
        lines += [f"slurm_supervise python -m at.sweep {shlex.quote(str(spec.path))} --out-root "
                  f"{root} --eval-only \"$name\""]
    return "\n".join(lines) + "\n"


SBATCH_OPTION = re.compile(r"[a-z][a-z0-9-]*")


def check_slurm_options(spec: Spec, script: str) -> None:
    """The spec's `slurm:` options as sbatch reads them: names of long options, one-line values,
    `array` left to the sweep; then, where sbatch is installed, `sbatch --test-only` (which
    submits nothing) must accept the script."""
    for key, value in spec.slurm.items():
        if not isinstance(key, str) or not SBATCH_OPTION.fullmatch(key):
            raise _fail(spec.path, f"slurm: {key!r} is not an sbatch option name (long form "
                                   f"without dashes, e.g. time or cpus-per-task)")
        if key == "array":
            raise _fail(spec.path, "slurm: array is set by the sweep (one task per run)")
        if value is not None and ("\n" in str(value) or not str(value).strip()):
            raise _fail(spec.path, f"slurm: {key} needs a one-line value")
    if shutil.which("sbatch") is None or subprocess.run(
            ["scontrol", "ping"], capture_output=True, timeout=60).returncode != 0:
        if spec.slurm:
            print("at.sweep: warning: no Slurm controller answers here; the slurm: options "
                  "are checked when the script is submitted", file=sys.stderr)
        return
    proc = subprocess.run(["sbatch", "--test-only"], input=script, capture_output=True,
                          text=True, timeout=60)
    if proc.returncode != 0:
        lines = [x.strip() for x in proc.stderr.splitlines() if x.strip()] or ["(no message)"]
        message = next((x for x in lines if "error" in x or "unrecognized" in x), lines[0])
        raise _fail(spec.path, f"sbatch refuses the slurm: options: {message}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m at.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", help="sweep spec (YAML)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--print", action="store_true", help="list the commands, run nothing")
    mode.add_argument("--slurm", action="store_true",
                      help="write <out_root>/sweep.sbatch, a Slurm job array, and run nothing")
    mode.add_argument("--eval-only", metavar="RUN",
                      help="only the spec's evaluations of the finished run RUN (a name)")
    p.add_argument("--out-root", help="another out_root than the spec's")
    p.add_argument("--resume", action="store_true",
                   help="continue in an out_root that holds runs of another spec")
    args = p.parse_args(argv)
    try:
        spec = load_spec(args.spec, args.out_root)
        runs = expand(spec)
        if not args.eval_only:  # a task of a --slurm sweep: checked when it was written
            check_eval_arguments(spec)
        if args.print:
            print_commands(spec, runs)
            return 0
        if args.eval_only:
            chosen = [r for r in runs if r.name == args.eval_only]
            if not chosen:
                raise ConfigError(f"no run named {args.eval_only!r} in {spec.path}")
            if run_state(chosen[0]) != "done":
                raise ConfigError(f"{chosen[0].out_dir} has not finished (no final.json)")
            return run_local(spec, chosen)
        if args.slurm:  # before the root is touched: a refused option leaves nothing behind
            text = slurm_script(spec, runs)
            check_slurm_options(spec, text)
        _root_lock = claim_root(spec.out_root)  # held until the sweep ends (at/lock.py)
        state = check_root(spec, runs, args.resume)
        # Everything that can refuse the command is checked before sweep.json is written.
        done = [r for r in runs if run_state(r) == "done"]
        for run in done:
            _check_done_run(spec, run)
        write_state(spec.out_root, state)
        for run in done:
            if update_reported(run):
                print(f"at.sweep: {run.name}: reported: target updated in its config.yaml",
                      flush=True)
        if args.slurm:
            script = spec.out_root / "sweep.sbatch"
            atomic_write(script, lambda f: f.write(text.encode()))
            os.chmod(script, 0o755)
            print(f"at.sweep: wrote {script} ({len(runs)} array tasks); submit with: "
                  f"sbatch {script}")
            return 0
        return run_local(spec, runs)
    except KeyboardInterrupt:  # Ctrl-C between two runs: nothing is half-written
        print("at.sweep: interrupted; run the same command again to continue", file=sys.stderr)
        return EXIT_INTERRUPTED
    except USER_ERRORS as err:
        return report("at.sweep", err)
    except OSError as err:
        print(f"at.sweep: error: {err.filename or ''}: {err.strerror or err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
