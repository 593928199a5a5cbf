"""Config: YAML + dotted overrides into frozen dataclasses, with errors that name the key."""
import dataclasses

import pytest

from mrjax.config import Config, ConfigError, load_config, to_dict


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides(tmp_path):
    path = write(tmp_path, "model:\n  name: tiny-random\nmesh:\n  fsdp: 2\niteration:\n  rho: [0, 0.32]\n")
    cfg = load_config(path, ["mesh.tensor=4", "train.learning_rate=1e-6", "dpo.loss_type=ipo"])
    assert cfg.model.name == "tiny-random"
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) == (-1, 2, 4)
    assert cfg.train.learning_rate == pytest.approx(1e-6) and isinstance(cfg.train.learning_rate, float)
    assert cfg.dpo.loss_type == "ipo"
    assert cfg.iteration.rho == (0.0, 0.32)
    assert cfg.train.batch_size == Config().train.batch_size  # untouched defaults stay


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().mesh.tensor = 3


def test_round_trip_through_dict(tmp_path):
    import yaml

    cfg = load_config(None, ["iteration.rho=[0.1, 0.2]", "seed=7"])
    again = load_config(write(tmp_path, yaml.safe_dump(to_dict(cfg))))
    assert again == cfg


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["mesh.tensr=4"], "unknown config key 'mesh.tensr'"),
        (["nosection.x=1"], "unknown config key 'nosection'"),
        (["train.min_bucket=32"], "'train.min_bucket' was replaced by train.pad_multiple"),
        (["mesh.tensor=four"], "'mesh.tensor' must be int"),
        (["train.learning_rate=fast"], "'train.learning_rate' must be float"),
        (["model.remat=3"], "'model.remat' must be bool"),
        (["model.remat_policy=most"], "'model.remat_policy' must be one of full, dots, got 'most'"),
        (["iteration.rho=[0, x]"], r"'iteration.rho\[1\]' must be float"),
        (["iteration.dpo_held_out=1"], r"'iteration.dpo_held_out' must be in \[0, 1\), got 1.0"),
        (["mesh"], "not of the form key.sub=value"),
        (["mesh=3"], "mesh: expected a mapping"),
    ],
)
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [unclosed"))
    with pytest.raises(ConfigError, match="unknown config key 'train.lr'"):
        load_config(write(tmp_path, "train:\n  lr: 0.1\n"))
