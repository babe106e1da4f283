"""import_upstream.py: upstream checkpoints → our run folder, checked against upstream's own outputs (fixture made with
upstream's classes, tests/fixtures/upstream/README.md) and against the paper-size key list of docs/upstream.md §4."""
import dataclasses
import os
from pathlib import Path

import pytest
import torch
import yaml

import import_upstream as iu
import runs
from model import Encoder, ModelConfig, PretrainHead, ProbeConfig, ProbeHead

FIXTURE = Path(__file__).parent / "fixtures" / "upstream"
ENCODER, CLASSIFIER = FIXTURE / "encoder.ckpt", FIXTURE / "classifier.ckpt"


@pytest.fixture(scope="module")
def outputs():
    return torch.load(FIXTURE / "outputs.pt", weights_only=True)


def read_checkpoint(run) -> tuple[dict, dict]:
    """(config, checkpoint) of a run folder, as runs.py reads them."""
    folder = runs.read_run(run)
    return folder.config, folder.checkpoint


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    run = tmp_path_factory.mktemp("imported")
    iu.main(["--encoder", str(ENCODER), "--probe", str(CLASSIFIER), "--run", str(run)])
    return run


def models(run, attention):
    """(encoder, pretrain head, probe) of an imported run, the encoder rebuilt for the given attention path."""
    config, ckpt = read_checkpoint(run)
    cfg = dataclasses.replace(runs.read_run(run).encoder().cfg, attention=attention)
    encoder = Encoder(cfg)
    encoder.load_state_dict({k[8:]: v for k, v in ckpt["model"].items() if k.startswith("encoder.")})
    head = PretrainHead(cfg)
    head.load_state_dict({k[5:]: v for k, v in ckpt["model"].items() if k.startswith("head.")})
    return encoder.eval(), head.eval(), runs.read_run(run).probe()


@pytest.mark.parametrize("attention", ["sdpa", "math"])
@pytest.mark.parametrize("tail", ["full", "padded"])
@torch.no_grad()
def test_outputs_equal_upstream(imported, outputs, attention, tail):
    encoder, head, probe = models(imported, attention)
    padding = outputs["padding_mask"] if tail == "padded" else None
    embeddings = encoder.embed(outputs["signals"], padding)                              # [B, C, N, D]
    torch.testing.assert_close(embeddings, outputs[f"embeddings_{tail}"], atol=1e-4, rtol=0)
    torch.testing.assert_close(head(embeddings), outputs[f"reconstruction_{tail}"], atol=1e-4, rtol=0)
    torch.testing.assert_close(probe(embeddings, padding), outputs[f"logits_{tail}"], atol=1e-4, rtol=0)


def test_run_folder(imported):
    config = yaml.safe_load((imported / "config.yaml").read_text())
    assert config["model"] == dataclasses.asdict(ModelConfig(n_channels=3, patch_len=25, max_patches=40, d_model=16,
                                                             n_layers=3, n_heads=2, d_ff=32))
    assert config["probe"] == dataclasses.asdict(ProbeConfig(n_channels=3, d_model=16, hidden_size=8))
    assert not list(imported.glob(".*tmp*"))


def test_encoder_only(tmp_path, outputs):
    iu.main(["--encoder", str(ENCODER), "--run", str(tmp_path)])
    config, ckpt = read_checkpoint(tmp_path)
    assert "model" in config and "probe" not in config
    assert any(k.startswith("head.") for k in ckpt["model"]) and not any(k.startswith("probe.") for k in ckpt["model"])
    embeddings = runs.read_run(tmp_path).encoder().embed(outputs["signals"])
    torch.testing.assert_close(embeddings, outputs["embeddings_full"], atol=1e-4, rtol=0)
    with pytest.raises(SystemExit, match="already holds a run"):
        iu.main(["--encoder", str(ENCODER), "--run", str(tmp_path)])


def rewrite(path, tmp_path, edit=lambda state: None, hyper=True, extra=None):
    """A copy of a fixture checkpoint with its state dict edited."""
    ckpt = torch.load(path, weights_only=True)
    edit(ckpt["state_dict"])
    if not hyper:
        ckpt.pop("hyper_parameters")
    ckpt.update(extra or {})
    out = tmp_path / f"edited_{path.name}"
    torch.save(ckpt, out)
    return out


def test_heads_from_scale_without_hyper_parameters(tmp_path):
    encoder = rewrite(ENCODER, tmp_path, hyper=False)
    iu.main(["--encoder", str(encoder), "--run", str(tmp_path / "run")])
    assert read_checkpoint(tmp_path / "run")[0]["model"]["n_heads"] == 2


@pytest.mark.parametrize("path, key", [(ENCODER, "model.layers.1.ff.3.weight"),
                                       (CLASSIFIER, "feedforward.rnn.weight_hh_l1_reverse"),
                                       (CLASSIFIER, "encoder.model.patch_encoder.W_P.2.bias")])
@pytest.mark.parametrize("fault", ["missing", "extra", "misshapen"])
def test_bad_key_is_one_line_naming_it(tmp_path, path, key, fault):
    def edit(state):
        if fault == "missing":
            state.pop(key)
        elif fault == "extra":
            state[key.replace("weight", "wieght").replace("bias", "bais")] = state[key]
        else:
            state[key] = state[key][..., :-1]
    bad = rewrite(path, tmp_path, edit)
    args = ["--encoder", str(bad)] if path == ENCODER else ["--encoder", str(ENCODER), "--probe", str(bad)]
    with pytest.raises(SystemExit) as failure:
        iu.main(args + ["--run", str(tmp_path / "run")])
    message = str(failure.value)
    assert "\n" not in message
    assert {"missing": "missing key", "extra": "unexpected key", "misshapen": "shape"}[fault] in message
    if fault == "misshapen":
        assert key in message and "expected" in message
    elif fault == "missing":
        assert key in message
    assert not (tmp_path / "run").exists()


class HyperParameters(dict):
    """Stands in for Lightning's AttributeDict: a dict subclass that weights_only=True refuses."""


class Dangerous:
    """Unpickling this would run a shell command; the restricted unpickler must never call it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickled_objects_fall_back_to_restricted_unpickler(tmp_path):
    marker = tmp_path / "code_ran"
    hyper = HyperParameters(torch.load(ENCODER, weights_only=True)["hyper_parameters"])
    encoder = rewrite(ENCODER, tmp_path, extra={"hyper_parameters": hyper, "lr_schedulers": [Dangerous(marker)]})
    with pytest.raises(Exception):
        torch.load(encoder, weights_only=True)
    state, hyper_read = iu.read_lightning(encoder)
    assert not marker.exists()
    assert hyper_read["n_heads"] == 2 and len(state) == 84


def test_warns_when_the_two_encoders_differ(tmp_path):
    def edit(state):
        state["encoder.model.pe.W_pos"] = state["encoder.model.pe.W_pos"] + 0.5
    classifier = rewrite(CLASSIFIER, tmp_path, edit)
    with pytest.warns(UserWarning, match="differs.*pe.pos_embed|differs.*pos_embed"):
        iu.main(["--encoder", str(ENCODER), "--probe", str(classifier), "--run", str(tmp_path / "run")])
    _, ckpt = read_checkpoint(tmp_path / "run")
    original = torch.load(CLASSIFIER, weights_only=True)["state_dict"]["encoder.model.pe.W_pos"]
    torch.testing.assert_close(ckpt["model"]["encoder.pos_embed"], original + 0.5)   # the classifier's copy wins


def test_help_says_where_weights_come_from(capsys):
    with pytest.raises(SystemExit):
        iu.main(["--help"])
    text = capsys.readouterr().out
    for needle in ("benmfox/PFTSleep", "pft_sleep_encoder.ckpt", "pft_sleep_classifier.ckpt", "huggingface-cli download",
                   "evaluate.py --run", "train_probe.py --encoder"):
        assert needle in text


# ----------------------------------------------------------------------------------------------------------------------
# Paper size: the key map against docs/upstream.md §4, no download


def paper_encoder_keys() -> dict:
    """docs/upstream.md §4 compact rule at the paper config: all 100 keys of pft_sleep_encoder.ckpt with shapes."""
    C, P, D, F, N = 7, 750, 512, 2048, 4800
    keys = {"model.revin.affine_weight": (1, C, 1), "model.revin.affine_bias": (1, C, 1), "model.pe.W_pos": (N, D)}
    for c in range(C):
        keys |= {f"model.patch_encoder.W_P.{c}.weight": (D, P), f"model.patch_encoder.W_P.{c}.bias": (D,),
                 f"model.head.W_P.{c}.weight": (P, D), f"model.head.W_P.{c}.bias": (P,)}
    for i in range(3):
        layer = f"model.layers.{i}."
        for m in ("W_Q", "W_K", "W_V", "to_out.0"):
            keys |= {f"{layer}self_attn.{m}.weight": (D, D), f"{layer}self_attn.{m}.bias": (D,)}
        keys[f"{layer}self_attn.sdp_attn.scale"] = ()
        for norm in ("norm_attn.1", "norm_ffn.1"):
            keys |= {f"{layer}{norm}.{leaf}": (D,) for leaf in ("weight", "bias", "running_mean", "running_var")}
            keys[f"{layer}{norm}.num_batches_tracked"] = ()
        keys |= {f"{layer}ff.0.weight": (F, D), f"{layer}ff.0.bias": (F,), f"{layer}ff.3.weight": (D, F),
                 f"{layer}ff.3.bias": (D,)}
    return keys


# docs/upstream.md §4b, the 24 probe keys (without `feedforward.`)
PAPER_PROBE_KEYS = {
    "affine_weight": (1, 7, 1), "affine_bias": (1, 7, 1),
    **{f"rnn.{name}_l{k}{rev}": shape for k, width in ((0, 3584), (1, 2048)) for rev in ("", "_reverse")
       for name, shape in (("weight_ih", (3072, width)), ("weight_hh", (3072, 1024)), ("bias_ih", (3072,)),
                           ("bias_hh", (3072,)))},
    "layers.0.0.weight": (1024, 2048), "layers.0.0.bias": (1024,), "layers.0.1.weight": (1024,),
    "layers.0.1.bias": (1024,), "layers.0.4.weight": (5, 1024), "layers.0.4.bias": (5,)}


def test_paper_size_key_map_matches_upstream_md():
    cfg, probe_cfg = ModelConfig(), ProbeConfig()
    ours = iu.our_shapes(cfg, probe_cfg)
    encoder = iu.upstream_shapes(iu.prefixed("model.", iu.encoder_table(cfg, with_head=True)), ours)
    expected = paper_encoder_keys()
    assert len(expected) == 100 and len(encoder) == 100
    assert {k: shape for k, (shape, _) in encoder.items()} == expected
    assert all(encoder[f"model.layers.{i}.norm_{n}.1.num_batches_tracked"][1] == torch.int64
               for i in range(3) for n in ("attn", "ffn"))
    probe = iu.upstream_shapes(iu.probe_table(probe_cfg), ours)
    assert len(PAPER_PROBE_KEYS) == 24
    assert {k: shape for k, (shape, _) in probe.items()} == PAPER_PROBE_KEYS
    # the classifier file: the encoder without head.* under encoder.model., the probe under feedforward.
    classifier = iu.prefixed("encoder.model.", iu.encoder_table(cfg, with_head=False)) | iu.prefixed(
        "feedforward.", iu.probe_table(probe_cfg))
    assert len(classifier) == 110


def test_paper_size_parameter_counts():
    with torch.device("meta"):
        encoder, head, probe = Encoder(ModelConfig()), PretrainHead(ModelConfig()), ProbeHead(ProbeConfig())
    trainable = sum(p.numel() for m in (encoder, head) for p in m.parameters())
    assert trainable == 17_299_600            # upstream 17,299,603 = this + 3 frozen sdp_attn.scale (dropped)
    assert sum(p.numel() for p in encoder.parameters()) == 14_606_353 - 3    # the classifier's encoder copy
    assert sum(p.numel() for p in probe.parameters()) == 49_315_859
