"""Config: base <- experiment <- CLI precedence, strict keys, fractions, provenance round trip."""
import re

import pytest
import yaml

from at.config import (
    BASE_CONFIG,
    ConfigError,
    dump_config,
    git_state,
    load_config,
    load_run_config,
    parse_value,
)

# configs/**/sweep_*.yaml are sweep specs (python -m at.sweep), not configs.
CONFIGS = sorted(p for p in BASE_CONFIG.parent.rglob("*.yaml")
                 if p != BASE_CONFIG and not p.name.startswith("sweep_"))
SWEEPS = sorted(BASE_CONFIG.parent.rglob("sweep_*.yaml"))


def test_precedence_base_then_experiment_then_cli(tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text("optim:\n  epochs: 7\n  lr: 0.05\nmethod:\n  ikl_at:\n    beta: 12\n")
    base = load_config()
    cfg = load_config(exp, ["optim.lr=0.3", "method.ikl_at.alpha=5"])
    assert base["optim"]["epochs"] == 200 and cfg["optim"]["epochs"] == 7   # experiment over base
    assert cfg["optim"]["lr"] == 0.3                                        # CLI over experiment
    assert cfg["method"]["ikl_at"]["beta"] == 12.0 and cfg["method"]["ikl_at"]["alpha"] == 5.0
    assert cfg["optim"]["momentum"] == base["optim"]["momentum"]             # untouched keys kept
    assert load_config(exp, ["optim.epochs=1", "optim.epochs=2"])["optim"]["epochs"] == 2


@pytest.mark.parametrize("source", ["yaml", "cli"])
def test_unknown_keys_are_errors_with_suggestions(tmp_path, source):
    if source == "yaml":
        exp = tmp_path / "exp.yaml"
        exp.write_text("optim:\n  epoch: 3\n")
        call = lambda: load_config(exp)  # noqa: E731
    else:
        call = lambda: load_config(None, ["optim.epoch=3"])  # noqa: E731
    with pytest.raises(ConfigError) as err:
        call()
    message = str(err.value)
    assert "'optim.epoch'" in message and "'optim.epochs'" in message and "\n" not in message


def test_fractions_exponents_and_types():
    cfg = load_config(None, ["attack.eps=8/255", "optim.weight_decay=5e-4",
                             "attack.step_size=2/255", "optim.lr=1"])
    assert cfg["attack"]["eps"] == pytest.approx(8 / 255, abs=0, rel=1e-15)
    assert cfg["optim"]["weight_decay"] == 5e-4 and isinstance(cfg["optim"]["lr"], float)
    assert load_config()["attack"]["eps"] == 8 / 255  # base.yaml itself says 8/255
    assert parse_value({"a": ["1/4", "x/y", " 3 / 6 "]}) == {"a": [0.25, "x/y", 0.5]}
    with pytest.raises(ConfigError, match="expects int"):
        load_config(None, ["optim.epochs=ten"])
    with pytest.raises(ConfigError, match="expects bool"):
        load_config(None, ["attack.eps_ramp=1"])
    with pytest.raises(ConfigError, match="section"):
        load_config(None, ["optim=3"])
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(None, ["optim.epochs"])
    with pytest.raises(ConfigError, match="division by zero"):
        load_config(None, ["attack.eps=8/0"])


def test_provenance_round_trip(tmp_path):
    cfg = load_config(None, ["attack.eps=8/255", "out_dir=" + str(tmp_path)])
    dump_config(cfg, tmp_path / "config.yaml", git=git_state())
    raw = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", raw["_git"]["sha"])
    assert isinstance(raw["_git"]["dirty"], bool)
    assert load_run_config(tmp_path) == cfg


@pytest.mark.parametrize("name,listed", [("digits", False), ("cifar10", False),
                                         ("imagenet", True), ("imagenet_lt", True)])
def test_config_yaml_lists_image_file_keys_only_for_image_file_data(tmp_path, name, listed):
    augment = ["data.augment=resized_crop_flip"] if listed else []  # base.yaml's is CIFAR's
    cfg = load_config(None, [f"data.name={name}", *augment, "out_dir=" + str(tmp_path)])
    dump_config(cfg, tmp_path / "config.yaml")
    data = yaml.safe_load((tmp_path / "config.yaml").read_text())["data"]
    for key in ("image_size", "resize_size", "workers", "lists", "num_classes"):
        assert (key in data) == listed, (name, key)
    assert "root" in data and "generated" in data
    assert load_run_config(tmp_path) == cfg  # nothing lost on reload


@pytest.mark.parametrize("path", CONFIGS,
                         ids=lambda p: str(p.relative_to(BASE_CONFIG.parent)))
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg["method"]["name"] in cfg["method"]


def test_every_base_key_is_documented():
    for line in BASE_CONFIG.read_text().splitlines():
        if re.match(r"^\s*[a-z_]+:", line):
            assert "#" in line, f"base.yaml key without a comment: {line.strip()}"


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(bad)


def test_duplicate_keys_and_syntax_errors_name_the_line(tmp_path):
    dup = tmp_path / "dup.yaml"
    dup.write_text("optim:\n  epochs: 3\n  lr: 0.1\n  epochs: 5\n")  # YAML would keep 5
    with pytest.raises(ConfigError, match=r"dup.yaml, line 4: duplicate key 'epochs' "
                                          r"\(first given on line 2\)"):
        load_config(dup)
    broken = tmp_path / "broken.yaml"
    broken.write_text("optim:\n  epochs: [3\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"broken.yaml, line 3: "):
        load_config(broken)


def test_merge_keys_non_utf8_and_one_line_duplicates(tmp_path):
    merged = tmp_path / "merged.yaml"
    merged.write_text("optim: {<<: {lr: 0.05, epochs: 2}, epochs: 3}\n")  # own keys win
    cfg = load_config(merged)
    assert (cfg["optim"]["lr"], cfg["optim"]["epochs"]) == (0.05, 3)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("optim:\n  lr: 0.05  # caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin.yaml is not UTF-8 text \(byte 0xe9 at "
                                          r"offset 24\); save it as UTF-8"):
        load_config(latin)
    same_line = tmp_path / "same_line.yaml"
    same_line.write_text("optim: {lr: 0.05, lr: 0.1}\n")
    with pytest.raises(ConfigError, match="duplicate key 'lr'"):
        load_config(same_line)


@pytest.mark.parametrize("override, needle", [
    ("optim.lr=.inf", "optim.lr is inf"),
    ("method.ikl_at.beta=.nan", "method.ikl_at.beta is nan"),
    ("optim.weight_decay=-.inf", "optim.weight_decay is -inf"),
    ("seed=-1", "seed must be an integer in [0, 2**32 - 1]"),
    (f"seed={2**32}", "got 4294967296"),
    ("model.name=wrn-99-9", "unknown model (model.name) 'wrn-99-9'"),
    ("data.name=mnistt", "unknown dataset (data.name) 'mnistt'"),
    ("method.name=IKL_AT", "unknown method (method.name) 'IKL_AT'"),
])
def test_values_that_would_fail_late_are_refused_at_load(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(BASE_CONFIG.parent / "digits" / "ikl_at.yaml", [override])
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert load_config(None, [f"seed={2**32 - 1}"])["seed"] == 2**32 - 1


def test_a_division_by_zero_names_its_key(tmp_path):
    with pytest.raises(ConfigError, match=r"^attack.eps: division by zero in '8/0'"):
        load_config(None, ["attack.eps=8/0"])
    exp = tmp_path / "exp.yaml"
    exp.write_text("attack:\n  step_size: 2/0\n")
    with pytest.raises(ConfigError, match=r"^attack.step_size: division by zero"):
        load_config(exp)


# Configs whose comments name a published number but that do not aim at it as they stand.
NO_TARGET = {"cifar100/pgd_at.yaml": "its number is AT-AWP's (awp.enabled=true)",
             "cifar100/trades.yaml": "no number for this recipe",
             "imagenet_lt/kd/baseline.yaml": "the number depends on model.name",
             "cifar10/ikl_at_autoaug.yaml": "no result is reported"}
_NUMBER = re.compile(r"\d+\.\d+")


def _comments(path) -> str:
    return "\n".join(line for line in path.read_text().splitlines()
                     if line.lstrip().startswith("#"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(BASE_CONFIG.parent)))
def test_every_config_aiming_at_a_published_row_declares_it(path):
    name = str(path.relative_to(BASE_CONFIG.parent))
    reported = load_config(path)["reported"]
    comments = _comments(path)
    says_reported = re.search(r"[Rr]eported[: ]", comments) is not None
    if name in NO_TARGET or not says_reported:
        assert reported is None, f"{name}: {NO_TARGET.get(name, 'no published number')}"
        return
    assert reported is not None, f"{name} names a reported number but has no reported: block"
    # The block repeats the comment's numbers (it is their machine-readable form).
    numbers = {float(x) for x in _NUMBER.findall(comments)}
    assert reported["clean"] in numbers, name
    assert reported["autoattack"] is None or reported["autoattack"] in numbers, name
    if reported["autoattack"] is not None:
        # LBGAT evaluated AutoAttack at 0.031, the others at 8/255.
        expected = 0.031 if "lbgat" in name else 8 / 255
        assert reported["norm"] == "linf" and reported["eps"] == pytest.approx(expected, rel=1e-9)
    else:
        assert "/kd/" in name  # only distillation rows are clean-only
    assert reported["source"]


def test_reported_blocks_are_validated_and_recorded(tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text("reported:\n  clean: 85.3\n  autoattack: 57.1\n  norm: linf\n  eps: 8/255\n"
                   "  source: a paper\n")
    cfg = load_config(exp, ["reported.clean=86"])  # one field overridden, the others kept
    assert cfg["reported"] == {"clean": 86.0, "autoattack": 57.1, "norm": "linf",
                               "eps": 8 / 255, "source": "a paper", "seeds": None, "runs": None}
    assert load_config(exp, ["reported=null"])["reported"] is None
    (tmp_path / "run").mkdir()
    dump_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_run_config(tmp_path / "run")["reported"] == cfg["reported"]  # the run records it
    bad = {"  autoattak: 57.1\n": "unknown field 'autoattak'",
           "  seeds: [0, x]\n": "reported.seeds",
           "  runs: 0\n": "reported.runs",
           "  seeds: [0, 1, 2]\n  runs: 5\n": "reported.seeds lists 3 seeds but reported.runs "
                                             "is 5",
           "  seeds: [0, 0]\n": "reported.seeds repeats a seed"}
    for line, message in bad.items():
        exp.write_text("reported:\n  clean: 85.3\n  source: a paper\n" + line)
        with pytest.raises(ConfigError, match=re.escape(message)) as err:
            load_config(exp)
        assert "\n" not in str(err.value) and "exp.yaml" in str(err.value)
    for args, message in [(["reported.clean=185", "reported.source=x"], "percentage"),
                          (["reported.clean=85"], "reported.source is required"),
                          (["reported.clean=85", "reported.source=x", "reported.autoattack=50"],
                           "reported.norm"),
                          (["reported.clean=85", "reported.source=x", "reported.autoattack=50",
                            "reported.norm=linf"], "reported.eps"),
                          (["reported.clean=85", "reported.source=x", "reported.eps=0.031"],
                           "give reported.autoattack"),
                          (["reported.clean=85", "reported.source=x", "reported.autoattack=50",
                            "reported.norm=linf", "reported.eps=8"], "(0, 1)"),
                          (["reported.clean=85", "reported.source=x", "reported.autoattack=50",
                            "reported.norm=l1", "reported.eps=.inf"], "finite")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(None, args)
    # AutoAttack's own L1 radius (12) and an L2 one above 1 are radii on the [0,1] scale.
    for norm, eps in (("l1", "12"), ("l2", "1.5")):
        cfg = load_config(None, ["reported.clean=85", "reported.source=x",
                                 "reported.autoattack=50", f"reported.norm={norm}",
                                 f"reported.eps={eps}", "reported.seeds=[0, 1]",
                                 "reported.runs=2"])
        assert cfg["reported"]["eps"] == float(eps)


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_shipped_sweep_specs_expand(path, monkeypatch):
    from at import sweep
    monkeypatch.chdir(BASE_CONFIG.parents[1])  # spec paths are relative to the repository root
    runs = sweep.expand(sweep.load_spec(path))
    assert runs and len({r.name for r in runs}) == len(runs)
    assert all(r.config["reported"] is None for r in runs)  # the digits have no published row
