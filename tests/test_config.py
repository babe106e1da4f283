"""config.py: YAML + command-line overrides onto the scripts' dataclasses."""
import pytest

import config
import training
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


def test_recipe_switches_with_unknown_values_are_one_line_errors(tmp_path):
    import torch

    cfg = config.load(train_probe.Config, "configs/probe_tiny.yaml", ["--train.schedule", "cosine"])
    with pytest.raises(SystemExit, match="train.schedule must be full or upstream, got 'cosine'"):
        training.one_cycle([torch.nn.Parameter(torch.zeros(1))], cfg.train, 10, 40)
    base = ["--config", "configs/probe_tiny.yaml", "--encoder", str(tmp_path / "none"), "--run-dir", str(tmp_path / "r")]
    with pytest.raises(SystemExit, match="train.loss_trim_wake must be one of paper, upstream, none"):
        train_probe.main([*base, "--train.loss_trim_wake", "sometimes"])
    with pytest.raises(SystemExit, match="train.best_metric must be val_loss or val_kappa, got 'kappa'"):
        train_probe.main([*base, "--train.best_metric", "kappa"])
    assert not (tmp_path / "r").exists()                                        # nothing written


def test_the_gpu_and_recipe_fields_with_wrong_values_are_one_line_errors():
    import train_pretrain
    for override, message in ((["--model.attention_kernels", "flashy"],
                               "config: model.attention_kernels must be one of no_cudnn, torch, efficient, math, got 'flashy'"),
                              (["--model.attention", "fast"], "config: model.attention must be one of sdpa, math, got 'fast'"),
                              (["--data.label_lag", "2"], "config: data.label_lag must be str, got 2"),
                              (["--data.label_lag", "two"], "config: data.label_lag must be none or upstream (got 'two')"),
                              (["--data.max_open_nights", "0"], "config: data.max_open_nights must be at least 1 (got 0)"),
                              (["--train.max_nonfinite_steps", "0"], "config: train.max_nonfinite_steps must be above 0, got 0")):
        with pytest.raises(SystemExit) as exit_info:
            config.load(train_pretrain.Config, "configs/pretrain_tiny.yaml", override)
        assert str(exit_info.value) == message, (override, str(exit_info.value))


@pytest.mark.parametrize("override, message", [
    (["--model.n_layers", "0"], "config: model.n_layers must be above 0, got 0"),
    (["--model.n_heads", "0"], "config: model.n_heads must be above 0, got 0"),
    (["--model.d_model", "0"], "config: model.d_model must be above 0, got 0"),
    (["--model.patch_len", "0"], "config: model.patch_len must be above 0, got 0"),
    (["--model.revin_eps", "0"], "config: model.revin_eps must be above 0, got 0.0"),
    (["--probe.n_layers", "0"], "config: probe.n_layers must be above 0, got 0"),
])
def test_zero_sizes_are_one_line_errors_when_the_config_is_built(override, message):
    """A transformer of 0 layers (or a GRU of 0) would train as if nothing were wrong: refused with the config."""
    import train_pretrain
    script = train_probe if override[0].startswith("--probe") else train_pretrain
    with pytest.raises(SystemExit) as exit_info:
        config.load(script.Config, f"configs/{'probe' if script is train_probe else 'pretrain'}_tiny.yaml", override)
    assert str(exit_info.value) == message
