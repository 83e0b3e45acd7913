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


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ({"fedce-rounds": True}, "'fedce-rounds' = True: Input should be a valid integer"),
        ({"lr": True}, "'lr' = True: Input should be a valid number"),
        ({"augment": "0"}, "'augment' = '0': Input should be a valid boolean"),
        ({"seed": 1.0}, "'seed' = 1.0: Input should be a valid integer"),
        ({"lr": float("inf")}, "'lr' = inf: Input should be a finite number"),
        ({"gate-noise": float("inf")}, "'gate-noise' = inf"),
        ({"fedsc-mu": float("nan")}, "'fedsc-mu' = nan"),
        ({"load-cap-slack": float("inf")}, "'load-cap-slack' = inf"),
        ({"run-name": "../../../escape"}, "'run-name' = '../../../escape'"),
        ({"run-name": "/tmp/abs"}, "'run-name' = '/tmp/abs'"),
        ({"run-name": ".hidden"}, "'run-name' = '.hidden'"),
        ({"test-per-client": 20000}, "needs 20000 test images of class 0; fashion-mnist has 1000 per class"),
        ({"train-per-client": 5500, "unlabeled-per-client": 600, "partition": "iid"}, "needs 6100 train images"),
        ({"moe-train-top-k": 17}, "moe-train-top-k = 17 exceeds num-experts = 16"),
        ({"mlp-hidden": 10**9}, "'mlp-hidden' = 1000000000"),
        ({"round-timeout": 1e-9}, "'round-timeout' = 1e-09"),
        ({"dp-epsilon": float("nan")}, "'dp-epsilon' = nan"),
    ],
)
def test_no_coercion_no_infinity_no_escape_no_oversized_request(override, needle):
    """Issue 12: values that used to be coerced or accepted are refused, naming the key."""
    with pytest.raises(ConfigError) as info:
        parse_run_config({**DEFAULTS, **override})
    assert needle in str(info.value)


@pytest.mark.parametrize(
    "override",
    [{"lr": 1}, {"dp-epsilon": float("inf")}, {"run-name": "paper_s0-tau0.1"}, {"train-per-client": 6000, "partition": "iid"},
     {"test-per-client": 1000}, {"dataset": "cifar10", "train-per-client": 5000, "partition": "iid"}],
)
def test_what_stays_allowed(override):
    """An int is a valid float, inf means "no noise" for dp-epsilon, the data set's full size is usable."""
    parse_run_config({**DEFAULTS, **override})


def test_nmoe_run_refuses_a_typo_before_starting_anything(capsys):
    from nmoe_flwr.cli.run import main

    assert main(["--app", str(ROOT), "--set", "fedce-round=5"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'fedce-round'" in err and "fedce-rounds" in err


def test_an_override_that_is_not_key_value_pairs_names_itself_and_the_quoting_rule(tmp_path):
    from nmoe_flwr.cli.flwr_process import merged_run_config

    preset = tmp_path / "p.toml"
    preset.write_text('run-name = "a"\nnum-clients = 4\n')
    assert merged_run_config(str(preset), ['run-name="b" tau=0.3']) == {"run-name": "b", "num-clients": 4, "tau": 0.3}
    with pytest.raises(ConfigError, match='"run-name=b".*double quotes'):
        merged_run_config(str(preset), ["run-name=b"])
    assert merged_run_config(None, ['run-name="a b" tau=0.3']) == {"run-name": "a b", "tau": 0.3}
    for text, leftover in (("tau", "'tau'"), ("tau=0.5 seed", "'seed'")):  # Flower's parser would drop these
        with pytest.raises(ConfigError, match=f'cannot parse "{text}".*{leftover} has no "=value"'):
            merged_run_config(None, [text])


def test_a_parsed_config_merges_like_a_preset_without_being_changed():
    """A killed run's recorded config (a mapping) is a preset like a TOML file: overrides win, the mapping stays."""
    from nmoe_flwr.cli.flwr_process import merged_run_config

    recorded = {"run-name": "a", "resume": True, "tau": 0.1}
    assert merged_run_config(recorded, ["tau=0.3"]) == {"run-name": "a", "resume": True, "tau": 0.3}
    assert recorded["tau"] == 0.1
    assert merged_run_config({}, None) == {}
