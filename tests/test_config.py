import pytest

from kd3.config import ConfigError, DistillConfig, from_dict, load_config, save_config


def test_yaml_and_overrides_resolve(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\ntrain:\n  epochs: 3\n  lr: 0.1\npool:\n  size: 100\n")
    cfg = load_config(DistillConfig, path, ["train.epochs=5", "pool.irrelevant_fraction=0.5", "method.name=kd3"])
    assert cfg.train.epochs == 5 and cfg.train.lr == 0.1
    assert cfg.pool.size == 100 and cfg.pool.irrelevant_fraction == 0.5
    assert cfg.method == {"name": "kd3"}
    assert cfg.train.batch_size == DistillConfig().train.batch_size


def test_unknown_key_is_named_with_the_valid_ones(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochz: 3\n")
    with pytest.raises(ConfigError) as error:
        load_config(DistillConfig, path)
    message = str(error.value)
    assert "train.epochz" in message and "train.epochs" in message and str(path) in message


def test_wrong_type_is_rejected_with_key():
    with pytest.raises(ConfigError, match=r"train\.epochs: expected int"):
        load_config(DistillConfig, None, ["train.epochs=ten"])
    with pytest.raises(ConfigError, match=r"train\.amp: expected bool"):
        load_config(DistillConfig, None, ["train.amp=3"])


def test_int_accepted_for_float_but_not_bool_for_int():
    assert load_config(DistillConfig, None, ["train.lr=1"]).train.lr == 1.0
    with pytest.raises(ConfigError):
        load_config(DistillConfig, None, ["train.epochs=true"])


def test_override_syntax_error():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(DistillConfig, None, ["train.epochs"])


def test_saved_config_loads_back_identically(tmp_path):
    cfg = load_config(DistillConfig, None, ["train.epochs=7", "method.temperature=2.0"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(DistillConfig, tmp_path / "config.yaml") == cfg


def test_method_options_validated_against_method_dataclass():
    from kd3.api import method_options
    from kd3.methods import get_method

    blind = get_method("blind_kd")
    assert method_options(blind, {"name": "blind_kd", "temperature": 2}).temperature == 2.0
    with pytest.raises(ConfigError, match="method.temprature"):
        method_options(blind, {"name": "blind_kd", "temprature": 2})
    with pytest.raises(ValueError, match="valid methods"):
        get_method("nope")


def test_from_dict_nested_mapping_required():
    with pytest.raises(ConfigError, match="train: expected a mapping"):
        from_dict(DistillConfig, {"train": 3})


def test_override_value_that_is_not_yaml_is_kept_as_string():
    cfg = load_config(DistillConfig, None, ["teacher.checkpoint={cache}/teachers/t.pt"])
    assert cfg.teacher.checkpoint == "{cache}/teachers/t.pt"


def test_base_preset_is_deep_merged_under_the_file(tmp_path):
    (tmp_path / "base.yaml").write_text("name: b\ntrain:\n  epochs: 3\n  lr: 0.1\nmethod:\n  name: blind_kd\n  temperature: 2.0\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nname: c\ntrain:\n  epochs: 9\nmethod:\n  name: kd3\n")
    cfg = load_config(DistillConfig, tmp_path / "child.yaml")
    assert cfg.name == "c" and cfg.train.epochs == 9 and cfg.train.lr == 0.1
    assert cfg.method == {"name": "kd3"}  # a method section replaces the base's whole
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(DistillConfig, tmp_path / "loop.yaml")
