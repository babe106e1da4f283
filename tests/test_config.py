"""config.py: YAML + command-line overrides onto the scripts' dataclasses."""
import pytest

import config
import train_probe


def test_overrides_parse_as_yaml_and_scientific_notation_without_a_dot():
    cfg = config.load(train_probe.Config, "configs/probe_tiny.yaml",
                      ["--train.max_lr", "1e-4", "--data.datasets", "[shhs,'mros:1']", "--data.stride_s", "null"])
    assert cfg.train.max_lr == 1e-4 and isinstance(cfg.train.max_lr, float)
    assert cfg.data.datasets == ["shhs", "mros:1"] and cfg.data.stride_s is None
    assert cfg.train.recipe == "tiny" and cfg.train.patience == 4             # from the YAML file


def test_unknown_or_mistyped_fields_are_one_line_errors():
    with pytest.raises(SystemExit, match=r"unknown field train.trim_wake \(fields: .*loss_trim_wake"):
        config.load(train_probe.Config, None, ["--train.trim_wake", "true"])
    with pytest.raises(SystemExit, match="train.max_lr must be float, got 'fast'"):
        config.load(train_probe.Config, None, ["--train.max_lr", "fast"])
