from pathlib import Path

import pytest
import yaml

from llmops.config import PipelineConfig, load_config
from llmops.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.data.path.exists(), f"{path.name} points at missing data {cfg.data.path}"
    assert (ROOT / cfg.training.deepspeed_config).is_file()


def test_defaults_are_valid_and_private():
    cfg = PipelineConfig()
    assert cfg.privacy.enabled and cfg.privacy.target_epsilon == 8.0 and cfg.privacy.noise_multiplier is None
    assert cfg.model.source == "smollm2"


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_exactly_one_noise_source_with_line_number(tmp_path):
    p = _write(tmp_path, "name: x\nprivacy:\n  target_epsilon: 3\n  noise_multiplier: 1.0\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert f"{p}:2" in msg and "exactly one of privacy.target_epsilon and privacy.noise_multiplier" in msg


def test_noise_multiplier_alone_is_fine(tmp_path):
    cfg = load_config(_write(tmp_path, "privacy:\n  target_epsilon: null\n  noise_multiplier: 1.1\n"))
    assert cfg.privacy.noise_multiplier == 1.1


def test_field_error_names_field_and_line(tmp_path):
    p = _write(tmp_path, "training:\n  method: lora\n  batch_size: -1\n")
    with pytest.raises(ConfigError, match=rf"{p}:3: training.batch_size: Input should be greater"):
        load_config(p)


def test_unknown_key_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"training.learnig_rate: Extra inputs are not permitted"):
        load_config(_write(tmp_path, "training:\n  learnig_rate: 0.1\n"))


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(_write(tmp_path, "training: [\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(_write(tmp_path, "- a\n- b\n"))


@pytest.mark.parametrize(
    "text,match",
    [
        ("model:\n  source: local\n", "source 'local' needs model.path"),
        ("model:\n  path: /x\n", "only used with source 'local'"),
        ("training:\n  batch_size: 4\n  micro_batch_size: 8\n", r"micro_batch_size \(8\) > batch_size \(4\)"),
        ("privacy:\n  target_epsilon: 20\n  dataset_budget_epsilon: 5\n", "exceeds dataset_budget_epsilon"),
        ("privacy:\n  noise_seed: 3\n", "needs privacy.reproducible_insecure"),
        ("validation:\n  pii: {passport: block}\n", "unknown PII category .passport."),
        ("validation:\n  pii: {emial: block}\n", "did you mean .email."),
        ("compression:\n  enabled: true\n  distill: true\n", "distill_data"),
        ("model:\n  source: tiny\n  tiny: {hidden: 30, heads: 4}\n", "divisible"),
    ],
)
def test_cross_field_rules(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_config(_write(tmp_path, text))


def test_overrides_are_typed(tmp_path):
    cfg = load_config(_write(tmp_path, "name: a\n"), {"training.max_steps": 3, "privacy.enabled": False})
    assert cfg.training.max_steps == 3 and cfg.privacy.enabled is False
    with pytest.raises(ConfigError, match="not a section"):
        load_config(_write(tmp_path, "name: a\n"), {"name.x": 1})


def test_config_round_trips_through_json():
    cfg = PipelineConfig()
    again = PipelineConfig.model_validate_json(cfg.model_dump_json())
    assert again == cfg
    assert yaml.safe_load(yaml.safe_dump(cfg.model_dump(mode="json")))["privacy"]["target_epsilon"] == 8.0
