"""Run configs: the quickstart recipe file is the default, unknown keys are errors naming the key."""

from pathlib import Path

import pytest

from vitlab.engine import RunConfig, load_config
from vitlab.engine.config import config_from_dict, config_to_dict

ROOT = Path(__file__).resolve().parents[2]


def test_quickstart_recipe_is_the_default():
    assert config_to_dict(load_config(ROOT / "configs" / "quickstart.yaml")) == config_to_dict(RunConfig())


def test_round_trip():
    cfg = RunConfig(seed=3)
    cfg.optim.lr = 1e-4
    assert config_from_dict(config_to_dict(cfg)) == cfg


@pytest.mark.parametrize(("bad", "key"), [({"optimm": {}}, "optimm"), ({"optim": {"lrr": 1}}, "lrr")])
def test_unknown_keys_are_named(bad, key):
    with pytest.raises(ValueError, match=key):
        config_from_dict(bad)
