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

CONFIGS = sorted(p for p in BASE_CONFIG.parent.rglob("*.yaml") if p != BASE_CONFIG)


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
    cfg = load_config(None, [f"data.name={name}", "out_dir=" + str(tmp_path)])
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


def test_a_division_by_zero_names_its_key(tmp_path):
    with pytest.raises(ConfigError, match=r"^attack.eps: division by zero in '8/0'"):
        load_config(None, ["attack.eps=8/0"])
    exp = tmp_path / "exp.yaml"
    exp.write_text("attack:\n  step_size: 2/0\n")
    with pytest.raises(ConfigError, match=r"^attack.step_size: division by zero"):
        load_config(exp)
