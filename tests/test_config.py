"""Config loading: presets validate, bad fields get errors naming them."""

from pathlib import Path

import pytest

from mmalign.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("name", ["demo.yaml", "quick.yaml", "limber.yaml", "published-clip-gemma2.yaml"])
def test_presets_validate(name):
    config = load_config(CONFIGS / name)
    assert config.name == name.removesuffix(".yaml")


def test_unknown_field_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  stepz: 10\n")
    with pytest.raises(ConfigError, match=r"train\.stepz = 10: unknown field.*accepted here: steps, batch_size"):
        load_config(path)


def test_wrong_type_names_field_and_value(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: fast\n")
    with pytest.raises(ConfigError, match=r"train\.lr = 'fast'"):
        load_config(path)


def test_invalid_adapter_kind_lists_accepted(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("adapter:\n  kind: transformer\n")
    with pytest.raises(ConfigError, match="'linear'"):
        load_config(path)


def test_missing_file_points_to_presets(tmp_path):
    with pytest.raises(ConfigError, match="configs/"):
        load_config(tmp_path / "absent.yaml")


def test_non_mapping_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)


def test_overrides_replace_top_level(tmp_path):
    config = load_config(CONFIGS / "quick.yaml", {"output_dir": str(tmp_path)})
    assert config.output_dir == str(tmp_path)


def test_published_preset_fails_clearly_offline(monkeypatch):
    from mmalign.lm import load_lm
    from mmalign.vision import load_vision_encoder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = load_config(CONFIGS / "published-clip-gemma2.yaml")
    with pytest.raises(FileNotFoundError, match="local checkpoint file as PRETRAINED"):
        load_vision_encoder(config.vision_encoder.spec, config.vision_encoder.image_size)
    with pytest.raises(FileNotFoundError, match="reaches the hub"):
        load_lm(config.lm.spec)
