import dataclasses

import pytest

from digitjax import registry
from digitjax.config import (
    Config,
    ConfigError,
    apply_overrides,
    check_values,
    config_hash,
    from_dict,
    parse_seeds,
    to_dict,
)


def test_overrides_are_parsed_to_the_field_types():
    c = apply_overrides(Config(), ["train.epochs=3", "optimizer.learning_rate=3e-3",
                                   "optimizer.nesterov=true", "model.name=keras_cnn",
                                   "seeds=0-2"])
    assert c.train.epochs == 3 and isinstance(c.train.epochs, int)
    assert c.optimizer.learning_rate == pytest.approx(3e-3)
    assert c.optimizer.nesterov is True
    assert c.model.name == "keras_cnn"
    assert c.seeds == (0, 1, 2)


def test_unknown_key_names_the_closest_keys():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.epoch'.*train\.epochs"):
        apply_overrides(Config(), ["train.epoch=2"])


@pytest.mark.parametrize("override", ["train.epochs=two", "train.batch_size=1.5",
                                      "optimizer.nesterov=maybe", "seeds=a-b"])
def test_wrong_type_is_a_config_error(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        apply_overrides(Config(), [override])


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(Config(), ["train.epochs"])


@pytest.mark.parametrize("override,message", [
    ("optimizer.learning_rate=-0.1", "learning_rate must be > 0"),
    ("train.batch_size=0", "batch_size must be >= 1"),
    ("train.epochs=0", "epochs must be >= 1"),
    ("train.select=best_test", "select must be best_val or final"),
    ("optimizer.name=lbfgs", "optimizer.name"),
])
def test_bad_values_are_rejected(override, message):
    with pytest.raises(ConfigError, match=message):
        check_values(apply_overrides(Config(), [override]))


def test_parse_seeds_ranges_and_lists():
    assert parse_seeds("0-2") == (0, 1, 2)
    assert parse_seeds("0,3,5") == (0, 3, 5)
    assert parse_seeds("4") == (4,)
    for bad in ("", "2-0", "x", "-1"):
        with pytest.raises(ValueError):
            parse_seeds(bad)


def test_config_hash_ignores_names_and_seeds_but_not_numbers():
    a = Config()
    assert config_hash(a) == config_hash(dataclasses.replace(a, name="x", seeds=(7,)))
    assert config_hash(a) != config_hash(apply_overrides(a, ["train.epochs=2"]))


def test_config_round_trips_through_a_dict():
    c = registry.get("keras_cnn").config
    assert from_dict(to_dict(c)) == c


def test_every_registered_experiment_is_a_valid_config():
    exps = registry.registry()
    assert registry.default_name() in exps
    for name, exp in exps.items():
        assert exp.config.name == name and exp.description
        check_values(exp.config)


def test_unknown_experiment_lists_the_closest():
    with pytest.raises(ConfigError, match=r"unknown experiment 'flax_cn'.*flax_cnn"):
        registry.get("flax_cn")


def test_every_registered_experiment_builds_its_model():
    from digitjax.runner import model_summary

    seen = {}
    for exp in registry.registry().values():
        registry.check_names(exp.config)
        key = (exp.config.model.name, exp.config.data.dataset)
        if key not in seen:
            seen[key] = model_summary(exp.config)
            assert "parameters" in seen[key]
