"""RobustBench model-zoo entries as evaluation targets: `rb:<dataset>/<threat>/<Name>` (or `rb:Name`
with --dataset and --threat), loaded by robustbench's own `load_model` (its architecture, its
checkpoint post-processing, its input normalisation inside the model) from
<model-dir>/<dataset>/<threat>/<Name>.pt, RobustBench's layout (docs/zoo.md).

With the file present nothing is downloaded; without it robustbench's own download runs, and
when that fails the error names the path to put the file at. Results go to
<model-dir>/../zoo/<dataset>_<threat>/<Name>/ unless --out says otherwise.
"""
from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Callable

import torch

from at.target import Target, sha256
from errors import EvalError, did_you_mean, unknown

from .robustbench_import import robustbench

PREFIX = "rb:"
DATASETS = ("cifar10", "cifar100", "imagenet")
THREATS = ("Linf", "L2")
CLAIMS = Path(__file__).with_name("data") / "robustbench_claims.json"
IMAGENET_SUBSET = 5000  # RobustBench's ImageNet evaluation set (its helper_files list)
WEIGHTS = "rb"          # the `weights` label in result file names
# The leaderboards' radii (RobustBench: 8/255 and 0.5 on CIFAR, 4/255 on ImageNet).
LEADERBOARD_EPS = {("cifar10", "Linf"): "8/255", ("cifar100", "Linf"): "8/255",
                   ("cifar10", "L2"): "0.5", ("imagenet", "Linf"): "4/255"}


@dataclass
class ZooTarget(Target):
    """A Target that is a RobustBench zoo entry, with the leaderboard's claim for it."""
    name: str = ""
    threat: str = ""
    claim: dict = field(default_factory=dict)
    test_data: Callable | None = None  # ImageNet: the entry's own preprocessing


def is_zoo(target) -> bool:
    return isinstance(target, str) and target.startswith(PREFIX)


@cache
def claims() -> dict:
    """The claimed-numbers file: {'commit': ..., 'entries': {'<dataset>_<threat>': {name: row}}}."""
    return json.loads(CLAIMS.read_text())


def claim_of(dataset: str, threat: str, name: str) -> dict:
    return claims()["entries"].get(f"{dataset}_{threat}", {}).get(name, {})


def parse(spec: str, dataset: str | None = None, threat: str | None = None
          ) -> tuple[str, str, str]:
    """'rb:cifar10/Linf/Name' or 'rb:Name' (+ dataset, threat) -> (dataset, threat, name)."""
    parts = spec[len(PREFIX):].split("/")
    if len(parts) == 3:
        ds, tm, name = parts
        for given, actual, what in ((dataset, ds, "dataset"), (threat, tm, "threat")):
            if given is not None and given != actual:
                raise EvalError(f"--{what} {given} contradicts {spec}")
    elif len(parts) == 1:
        name, ds, tm = parts[0], dataset, threat
        if ds is None or tm is None:
            raise EvalError(f"{spec}: give the dataset and threat, as rb:<dataset>/<threat>/<Name>"
                            f" or with --dataset and --threat")
    else:
        raise EvalError(f"cannot read {spec!r}; write rb:<dataset>/<threat>/<Name>, e.g. "
                        f"rb:cifar100/Linf/Cui2023Decoupled_WRN-28-10")
    if ds not in DATASETS:
        raise unknown("RobustBench dataset", ds, DATASETS, source=spec)
    if tm not in THREATS:
        raise unknown("RobustBench threat model", tm, THREATS, source=spec)
    if not name:
        raise EvalError(f"{spec}: no model name")
    return ds, tm, name


def zoo_names(dataset: str, threat: str) -> list[str]:
    """The entries robustbench's model zoo has for (dataset, threat), in its order."""
    rb = robustbench()
    zoo = rb.model_dicts.get(rb.BenchmarkDataset(dataset), {})
    return list(zoo.get(rb.ThreatModel(threat), {}))


def check_name(dataset: str, threat: str, name: str) -> None:
    """Refuse a name the zoo does not have for (dataset, threat): say where it is, or suggest the
    closest names."""
    names = zoo_names(dataset, threat)
    if name in names:
        return
    elsewhere = [f"{ds}/{tm}" for ds in DATASETS for tm in THREATS
                 if (ds, tm) != (dataset, threat) and name in zoo_names(ds, tm)]
    if elsewhere:
        raise EvalError(f"{name} is a RobustBench {' and '.join(elsewhere)} entry, not "
                        f"{dataset}/{threat}: use rb:{elsewhere[0]}/{name}")
    hint = did_you_mean(name, names, n=3)
    raise EvalError(f"unknown RobustBench {dataset}/{threat} entry {name!r}"
                    f"{'; ' + hint if hint else ''} ({len(names)} entries: python -m eval.zoo "
                    f"{dataset} {threat} --list)")


def checkpoint_path(model_dir: str | Path, dataset: str, threat: str, name: str) -> Path:
    return Path(model_dir) / dataset / threat / f"{name}.pt"


def _file_problem(path: Path) -> str | None:
    """Why the file at the zoo path is not a torch checkpoint (None when it may be one)."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "is empty"
    if head.lstrip()[:1] == b"<":
        return "is an HTML page, not a checkpoint (a failed download?)"
    if head[:2] == b"PK" and not zipfile.is_zipfile(path):
        return "is truncated (an incomplete download?)"
    return None


def out_dir_of(model_dir: str | Path, dataset: str, threat: str, name: str) -> Path:
    return Path(model_dir).parent / "zoo" / f"{dataset}_{threat}" / name


def load_zoo_target(spec: str, *, dataset: str | None = None, threat: str | None = None,
                    model_dir: str | Path = "models", device: str | torch.device | None = None,
                    data_root: str | None = None, out: str | Path | None = None,
                    need_data: bool = True) -> ZooTarget:
    """The zoo entry `spec` as a ZooTarget in eval mode, float32, on `device`."""
    ds, tm, name = parse(spec, dataset, threat)
    rb = robustbench()
    check_name(ds, tm, name)
    if ds == "imagenet" and need_data and data_root is None:
        raise EvalError(f"{spec}: ImageNet entries are evaluated on RobustBench's 5,000-image "
                        f"subset of the validation set: give --data-root (a folder with val/)")
    path = checkpoint_path(model_dir, ds, tm, name)
    present = path.is_file()
    if present and (problem := _file_problem(path)):
        raise EvalError(f"{path} {problem}: remove it and download it again")
    try:
        model = rb.load_model(name, model_dir=str(model_dir), dataset=ds, threat_model=tm)
    except ImportError as err:  # an entry whose architecture needs an optional package
        raise EvalError(f"loading {name} needs the package {err.name or err}, which is not "
                        f"installed") from None
    except RuntimeError as err:
        if "state_dict" in str(err):
            raise EvalError(f"{path} holds weights of another architecture than {name}'s "
                            f"({_first_line(err)})") from None
        if present:
            raise EvalError(f"{path} is not a loadable checkpoint ({_first_line(err)}): remove "
                            f"it and download it again") from None
        raise
    except Exception as err:  # noqa: BLE001 - a download failure has many types (requests, gdown)
        if present:
            raise EvalError(f"{path} is not a loadable checkpoint ({_first_line(err)}): remove "
                            f"it and download it again") from None
        raise EvalError(f"{name} is not in {path.parent} and could not be downloaded "
                        f"({type(err).__name__}); put its checkpoint at {path}") from None
    if not path.is_file():  # a timm entry: robustbench's timm download, no file of ours
        raise EvalError(f"{name} is a timm entry (weights from the Hugging Face hub), not a file "
                        f"at {path}; not supported here")
    try:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise EvalError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    model = model.to(device).float().eval()
    claim = claim_of(ds, tm, name)
    test_data = _imagenet_loader(ds, tm, name, data_root) if ds == "imagenet" else None
    return ZooTarget(model=model, arch=claim.get("architecture") or type(model).__name__,
                     dataset=ds, weights=WEIGHTS, checkpoint=path, checkpoint_sha256=sha256(path),
                     out_dir=Path(out) if out else out_dir_of(model_dir, ds, tm, name),
                     data_root=data_root or "data", name=name, threat=tm, claim=claim,
                     test_data=test_data)


def _first_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:200] + ("..." if len(text) > 200 else "")


def _imagenet_loader(dataset: str, threat: str, name: str, root: str | None) -> Callable:
    """RobustBench's ImageNet subset with the entry's own preprocessing, as (x, y)."""
    def load(n_examples: int | None):
        n = IMAGENET_SUBSET if n_examples is None else n_examples
        if not 1 <= n <= IMAGENET_SUBSET:
            raise EvalError(f"--n-ex must be in [1, {IMAGENET_SUBSET}] for RobustBench's ImageNet "
                            f"subset, got {n}")
        if not (Path(root) / "val").is_dir():
            raise EvalError(f"{root}/val does not exist: --data-root must hold the ImageNet "
                            f"validation images in val/<class>/")
        from robustbench.data import get_preprocessing, load_imagenet
        rb = robustbench()
        prep = get_preprocessing(rb.BenchmarkDataset(dataset), rb.ThreatModel(threat), name, None)
        return load_imagenet(n, str(root), prep)
    return load


def results_dir(spec: str, model_dir: str | Path = "models", dataset: str | None = None,
                threat: str | None = None) -> Path:
    """Where an rb: target's results are (eval.plot, eval.summary), without loading it."""
    return out_dir_of(model_dir, *parse(spec, dataset, threat))


def claimed_robust(claim: dict) -> float | None:
    """The leaderboard's robust accuracy: AutoAttack's, or the lower external evaluation."""
    values = [v for v in (claim.get("autoattack"), claim.get("external")) if v is not None]
    return min(values) if values else None


def claim_fields(claim: dict, clean_ci: tuple, robust_ci: tuple) -> dict:
    """The claimed numbers next to a measurement, and whether each claim lies outside the
    measured 95 % interval (only then is the gap significant; docs/zoo.md#confidence-intervals)."""
    from .confidence import outside
    robust = claimed_robust(claim)
    return {"claimed": {"clean": claim.get("clean"), "robust": robust,
                        "source": f"RobustBench model_info at {claims()['commit']}"},
            "claim_outside_ci95": {"clean": outside(claim.get("clean"), clean_ci),
                                   "robust": outside(robust, robust_ci)}}
