import pytest
import yaml

from defectforge.config import ConfigError, load_config, parse_overrides, save_config
from synth.compose import SynthConfig


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(SynthConfig, write(tmp_path, "num_samples: 5\n"), ["image_size=[100,70]", "seed=3"])
    assert cfg.num_samples == 5 and cfg.size == (100, 70) and cfg.seed == 3
    assert load_config(SynthConfig, None, ["image_size=128"]).size == (128, 128)


def test_unknown_key_in_file_names_it_and_the_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'num_sample'.*did you mean num_samples"):
        load_config(SynthConfig, write(tmp_path, "num_sample: 5\n"))


def test_unknown_override_key():
    with pytest.raises(ConfigError, match=r"unknown key 'shardsize'.*shard_size"):
        load_config(SynthConfig, None, ["shardsize=3"])


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError, match=r"num_samples.*abc"):
        load_config(SynthConfig, None, ["num_samples=abc"])


@pytest.mark.parametrize("override, key", [
    ("val_ratio=1.5", "val_ratio"), ("image_size=[10,10]", "image_size"), ("image_size=[1,2,3]", "image_size"),
    ("workers=-1", "workers"), ("backend=magic", "backend"), ("surfaces.marble=1", "surfaces.marble"),
    ("defects_per_image=[3,1]", "defects_per_image"), ("image_format=gif", "image_format"),
    ("background_dir=/no/such/folder", "background_dir"),
])
def test_bad_values_name_key_value_and_expectation(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(SynthConfig, None, [override])
    assert f"'{key}'" in str(err.value) and "expected" in str(err.value)


def test_mapping_in_file_replaces_the_default_mapping(tmp_path):
    cfg = load_config(SynthConfig, write(tmp_path, "surfaces: {metal: 1.0}\n"))
    assert cfg.surfaces == {"metal": 1.0}
    # a dotted override edits the mapping instead of replacing it
    cfg = load_config(SynthConfig, None, ["surfaces.metal=0"])
    assert cfg.surfaces["metal"] == 0 and cfg.surfaces["concrete"] == 1.0
    # class order (and so the mask values) follows the listed order
    cfg = load_config(SynthConfig, write(tmp_path, "defects: {pit: 1, crack: 2}\n"))
    assert cfg.classes == ["background", "pit", "crack"]


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(SynthConfig, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(SynthConfig, write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="not of the form key=value"):
        parse_overrides(["seed"])


def test_saved_config_loads_back_identically(tmp_path):
    cfg = load_config(SynthConfig, None, ["image_size=[96,64]", "defects={crack: 1}"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(SynthConfig, tmp_path / "run" / "config.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["image_size"] == [96, 64]
