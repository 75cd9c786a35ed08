"""Configuration: configs/base.yaml <- experiment YAML <- `dotted.key=value` overrides.

base.yaml declares every key; anything else is rejected with a close-match suggestion. Values are
parsed with `yaml.safe_load`; strings like `8/255` become floats. A config is a plain nested dict.
"""
from __future__ import annotations

import copy
import re
import subprocess
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable

import yaml

from errors import ConfigError, unknown

from .checkpoint import atomic_write
from .config_check import check_config
from .reported import check_reported

REPO_ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO_ROOT / "configs" / "base.yaml"
_FRACTION = re.compile(r"^\s*[-+]?\d+(\.\d*)?\s*/\s*\d+(\.\d*)?\s*$")
# YAML 1.1 reads `5e-4` (no dot) as a string; accept it as the float everybody means.
_EXPONENT = re.compile(r"^\s*[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+\s*$")


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (plain YAML silently keeps
    the last one, so an edit further down a config could be quietly ignored)."""

    def construct_mapping(self, node, deep=False):
        first_line: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor`: merged by the base class; its own keys win
            key = self.construct_object(key_node, deep=deep)
            mark = key_node.start_mark
            try:  # line and column: `{lr: 1, lr: 2}` repeats a key on one line
                line, column = first_line.setdefault(key, (mark.line, mark.column))
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if (line, column) != (mark.line, mark.column):
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first given on line {line + 1})",
                    key_node.start_mark)
        return super().construct_mapping(node, deep)


def parse_value(value: Any, key: str = "") -> Any:
    """Turn fraction strings ('8/255') into floats, recursively; leave everything else alone.
    `key`: the dotted key of `value`, named in errors."""
    if isinstance(value, str) and _FRACTION.match(value):
        num, den = value.split("/")
        if float(den) == 0:
            raise ConfigError(f"{key + ': ' if key else ''}division by zero in {value!r}")
        return float(Fraction(num.strip()) / Fraction(den.strip()))
    if isinstance(value, str) and _EXPONENT.match(value):
        return float(value)
    if isinstance(value, dict):
        return {k: parse_value(v, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [parse_value(v, key) for v in value]
    return value


def flatten(tree: dict, keep: tuple[str, ...] = (), prefix: str = "") -> dict[str, Any]:
    """{'optim': {'lr': 0.1}} -> {'optim.lr': 0.1}: the leaves under their dotted keys. An empty
    mapping is a leaf, and so is a section named (by its dotted key) in `keep`."""
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        key = prefix + str(k)
        if isinstance(v, dict) and v and key not in keep:
            flat.update(flatten(v, keep, key + "."))
        else:
            flat[key] = v
    return flat


def sections(flat: dict[str, Any]) -> set[str]:
    """The dotted keys of the sections of a flattened tree: the mappings holding other keys, and
    the empty ones."""
    out = {k for k, v in flat.items() if isinstance(v, dict) and not v}
    for key in flat:
        parts = key.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return out


def _check_type(key: str, default: Any, value: Any, source: str) -> Any:
    """Values must keep the type declared in base.yaml (ints may widen to floats; null is free)."""
    if default is None or value is None:
        return value
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(default, bool) and isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float))
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        value = int(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(f"config key {key!r} expects {type(default).__name__}, got {value!r} "
                          f"(from {source})")
    return value


def merge(base: dict, diff: dict, source: str, prefix: str = "", root: dict | None = None) -> dict:
    """Return `base` updated with `diff`; every key of `diff` must already exist in `base`."""
    root = base if root is None else root
    out = copy.deepcopy(base)
    for k, v in diff.items():
        key = prefix + str(k)
        if k not in base:
            known = sorted({*flatten(root), *sections(flatten(root))})
            raise unknown("config key", key, known, listed=None, n=3, source=source)
        if isinstance(base[k], dict):
            if not isinstance(v, dict):
                raise ConfigError(f"config key {key!r} is a section; set its entries instead "
                                  f"(from {source})")
            out[k] = merge(base[k], v, source, key + ".", root)
        else:
            out[k] = _check_type(key, base[k], v, source)
    return out


def read_yaml(path: Path) -> dict:
    """A YAML file holding a mapping (no key given twice), fractions parsed (`parse_value`)."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text (byte {err.object[err.start]:#04x} at "
                          f"offset {err.start}); save it as UTF-8") from None
    except yaml.MarkedYAMLError as err:  # the line is the part a user needs
        mark = err.problem_mark or err.context_mark
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"cannot parse {path}{where}: {err.problem or err.context}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"cannot parse {path}: {str(err).splitlines()[0]}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys")
    return parse_value(data)


def parse_overrides(overrides: Iterable[str]) -> dict:
    """['optim.epochs=1', 'attack.eps=8/255'] -> nested dict."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        try:
            value = parse_value(yaml.safe_load(raw), key.strip()) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override")
        node[parts[-1]] = value
    return tree


_ABSENT = object()


def _with_reported(cfg: dict, layer: dict, source: str) -> dict:
    """merge() for a layer that may hold a `reported:` block: the block has its own fields
    (at/reported.py), which a later layer updates one by one (`reported.clean=60`) or clears
    (`reported=null`)."""
    layer = dict(layer)
    block = layer.pop("reported", _ABSENT)
    cfg = merge(cfg, layer, source)
    if block is not _ABSENT:
        if isinstance(block, dict) and isinstance(cfg.get("reported"), dict):
            block = {**{k: v for k, v in cfg["reported"].items() if v is not None}, **block}
        cfg["reported"] = check_reported(block, source)
    return cfg


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> dict:
    """Resolve base.yaml <- experiment YAML at `path` <- overrides (later wins), then check the
    values (at/config_check.py: each section by the module that owns it), so that a bad value
    stops the command here, before any data is read or any directory written."""
    cfg = read_yaml(BASE_CONFIG)
    if path is not None:
        cfg = _with_reported(cfg, read_yaml(Path(path)), str(path))
    cfg = _with_reported(cfg, parse_overrides(overrides), "command line")
    check_config(cfg)
    return cfg


def git_state() -> dict:
    """Commit SHA of the code and whether the working tree has uncommitted changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    try:
        sha = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        sha, dirty = "", False
    return {"sha": sha or "unknown", "dirty": dirty}


# data.* keys read only for image-file datasets (data/folder.py: ImageNet, ImageNet-LT).
FOLDER_ONLY_DATA_KEYS = ("image_size", "resize_size", "workers", "lists", "num_classes")


def dump_config(cfg: dict, path: Path, **provenance: Any) -> None:
    """Write the resolved config; provenance goes under '_'-prefixed keys (ignored on reload).
    A CIFAR or digits run's file leaves out the image-file-only data keys: listed, they would
    suggest settings the run never used (load_run_config fills the defaults back in)."""
    from data import FOLDER_DATASETS  # lazily: the data package imports torch

    doc = {**cfg, **{f"_{k}": v for k, v in provenance.items()}}
    data = cfg.get("data")
    if isinstance(data, dict) and data.get("name") not in FOLDER_DATASETS:
        doc["data"] = {k: v for k, v in data.items() if k not in FOLDER_ONLY_DATA_KEYS}
    text = yaml.safe_dump(doc, sort_keys=False)
    atomic_write(path, lambda f: f.write(text.encode()))


def load_run_config(run_dir: str | Path) -> dict:
    """The resolved config a run was started with (provenance dropped, unknown keys rejected)."""
    path = Path(run_dir) / "config.yaml"
    data = {k: v for k, v in read_yaml(path).items() if not str(k).startswith("_")}
    return _with_reported(read_yaml(BASE_CONFIG), data, str(path))
