"""Run-config validation: defaults, presets and fast, clear rejection."""

from pathlib import Path

import pytest
import tomllib
from pydantic import ValidationError

from nmoe_flwr.config import ConfigError, RunConfig, parse_run_config, valid_keys

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def test_every_key_has_a_default_in_pyproject_and_a_field_in_the_model():
    assert list(DEFAULTS) == valid_keys()
    assert parse_run_config(DEFAULTS) == RunConfig()  # pyproject and model agree


@pytest.mark.parametrize("preset", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_presets_are_valid(preset):
    overrides = tomllib.loads(preset.read_text())
    assert set(overrides) <= set(DEFAULTS), f"{preset.name} uses unknown keys"
    parse_run_config({**DEFAULTS, **overrides})


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ({"tau": 1.5}, ["'tau' = 1.5", "< 1.0"]),
        ({"gate-method": "foo"}, ["'gate-method' = 'foo'", "'fedgate', 'fedavg', 'local'"]),
        ({"num-clients": "ten"}, ["'num-clients' = 'ten'", "int"]),
        ({"partition": "dirichlet"}, ["'partition' = 'dirichlet'", "'iid', 'dominant'"]),
        ({"top-k": 11}, ["top-k = 11 exceeds num-clients = 10"]),
        ({"no-such-key": 1}, ["unknown key 'no-such-key'", "valid keys: seed, run-name"]),
    ],
)
def test_bad_values_fail_with_key_value_and_allowed(override, needles):
    with pytest.raises(ConfigError) as info:
        parse_run_config({**DEFAULTS, **override})
    for needle in needles:
        assert needle in str(info.value)


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as info:
        parse_run_config({"tau": 0.0, "device": "tpu"})
    assert "'tau'" in str(info.value) and "'device'" in str(info.value)


def test_config_is_frozen():
    """Assigning to a field of a parsed config is refused and leaves the value unchanged."""
    cfg = RunConfig()
    with pytest.raises(ValidationError, match="Instance is frozen") as info:
        cfg.tau = 0.5  # type: ignore[misc]
    assert [e["type"] for e in info.value.errors()] == ["frozen_instance"]
    assert cfg.tau == 0.1
