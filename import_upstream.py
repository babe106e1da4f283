r"""Import the published PFTSleep checkpoints (Lightning files of benmfox/PFTSleep) into a run folder of ours.

    python import_upstream.py --encoder weights/pft_sleep_encoder.ckpt --run-dir runs/upstream_encoder
    python import_upstream.py --encoder weights/pft_sleep_encoder.ckpt --probe weights/pft_sleep_classifier.ckpt \
        --run-dir runs/upstream

Where the weights come from: they are gated on Hugging Face (repo `benmfox/PFTSleep`). Accept the licence on
https://huggingface.co/benmfox/PFTSleep while logged in, create an access token, then

    huggingface-cli login            # or: export HF_TOKEN=...
    huggingface-cli download benmfox/PFTSleep pft_sleep_encoder.ckpt pft_sleep_classifier.ckpt --local-dir weights/

Writes RUN/config.yaml (`model:` section, plus `probe:` when --probe is given) and RUN/ckpt_final.pt ({"model":
state dict in our names: encoder.*, head.* (pretrain head, from the encoder file), probe.*}), the layout of our own
training runs, so the usual tools take it:

    python evaluate.py --run RUN ...             # stage nights with the imported encoder + probe (needs --probe)
    python train_probe.py --encoder RUN ...      # train a new probe on the imported, frozen encoder

Upstream key → ours (docs/upstream.md §4). The encoder file prefixes
`model.`; the classifier file holds its own copy of the encoder under `encoder.model.` (without `head.*`) and the
probe under `feedforward.`. c = channel, i = layer, k = GRU layer.

    upstream key (no prefix)                       ours                           how
    revin.affine_weight / affine_bias  [1, C, 1]   encoder.revin_weight / _bias   .view(C)
    patch_encoder.W_P.{c}.weight / bias            encoder.patch_weight / _bias   stacked over c → [C, D, P] / [C, D]
    pe.W_pos                                       encoder.pos_embed              as is
    layers.{i}.self_attn.W_Q / W_K / W_V .*        encoder.layers.{i}.attn.query / key / value .*
    layers.{i}.self_attn.to_out.0.*                encoder.layers.{i}.attn.out.*
    layers.{i}.self_attn.sdp_attn.scale  []        dropped: frozen (d_model / n_heads)^-0.5, checked, gives n_heads
    layers.{i}.norm_attn.1.* (BatchNorm1d)         encoder.layers.{i}.norm_attn.*
    layers.{i}.ff.0.* / ff.3.*                     encoder.layers.{i}.ff_in.* / ff_out.*
    layers.{i}.norm_ffn.1.*                        encoder.layers.{i}.norm_ff.*
    head.W_P.{c}.weight / bias                     head.weight / bias             stacked over c → [C, P, D] / [C, P]
    affine_weight / affine_bias  [1, C, 1]         probe.channel_weight / _bias   .view(C)
    rnn.{weight,bias}_{ih,hh}_l{k}[_reverse]       probe.gru.*                    as is
    layers.0.{0,1,4}.*                             probe.mlp.{0,1,4}.*            as is

Every key must be used and every expected key present, with the expected shape; anything else stops the import
with one line naming the key. Sizes are read off the tensors; n_heads from `hyper_parameters` when present, else from
the frozen attention scale. The rest of the config is the paper's (ModelConfig / ProbeConfig defaults).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # before torch loads OpenMP: docs/benchmarks.md "Threads"

import argparse
import dataclasses
import pickle
import re
import warnings
from pathlib import Path

import torch

import runs
from model import Encoder, ModelConfig, ProbeConfig, ProbeHead, PretrainHead

# what to do with an upstream tensor: "copy" as is, "view" [1, C, 1] → [C], "stack" as row c of a [C, …] tensor,
# "drop" (the frozen attention scale: our model derives it from the head width)
LAYER_MODULES = {"self_attn.W_Q": "attn.query", "self_attn.W_K": "attn.key", "self_attn.W_V": "attn.value",
                 "self_attn.to_out.0": "attn.out", "norm_attn.1": "norm_attn", "ff.0": "ff_in", "ff.3": "ff_out",
                 "norm_ffn.1": "norm_ff"}
BATCH_NORM = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


class ImportFailure(SystemExit):
    """A one-line, user-facing failure (a SystemExit, so the CLI prints it without a traceback)."""


# ----------------------------------------------------------------------------------------------------------------------
# The key table: upstream key → (our key, how, channel)


def encoder_table(cfg: ModelConfig, with_head: bool) -> dict[str, tuple[str, str, int | None]]:
    """Upstream encoder keys (no `model.` prefix) → (our key, how, channel)."""
    table = {"revin.affine_weight": ("encoder.revin_weight", "view", None),
             "revin.affine_bias": ("encoder.revin_bias", "view", None),
             "pe.W_pos": ("encoder.pos_embed", "copy", None)}
    for c in range(cfg.n_channels):
        table[f"patch_encoder.W_P.{c}.weight"] = ("encoder.patch_weight", "stack", c)
        table[f"patch_encoder.W_P.{c}.bias"] = ("encoder.patch_bias", "stack", c)
    for i in range(cfg.n_layers):
        for theirs, ours in LAYER_MODULES.items():
            leaves = BATCH_NORM if theirs.startswith("norm") else ("weight", "bias")
            for leaf in leaves:
                table[f"layers.{i}.{theirs}.{leaf}"] = (f"encoder.layers.{i}.{ours}.{leaf}", "copy", None)
        table[f"layers.{i}.self_attn.sdp_attn.scale"] = (f"encoder.layers.{i}.attn.scale", "drop", None)
    if with_head:
        for c in range(cfg.n_channels):
            table[f"head.W_P.{c}.weight"] = ("head.weight", "stack", c)
            table[f"head.W_P.{c}.bias"] = ("head.bias", "stack", c)
    return table


def probe_table(cfg: ProbeConfig) -> dict[str, tuple[str, str, int | None]]:
    """Upstream probe keys (no `feedforward.` prefix) → (our key, how, channel)."""
    table = {"affine_weight": ("probe.channel_weight", "view", None),
             "affine_bias": ("probe.channel_bias", "view", None)}
    for k in range(cfg.n_layers):
        for suffix in ("", "_reverse"):
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                key = f"{name}_l{k}{suffix}"
                table[f"rnn.{key}"] = (f"probe.gru.{key}", "copy", None)
    for j in (0, 1, 4):
        for leaf in ("weight", "bias"):
            table[f"layers.0.{j}.{leaf}"] = (f"probe.mlp.{j}.{leaf}", "copy", None)
    return table


def our_shapes(cfg: ModelConfig, probe_cfg: ProbeConfig | None = None) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Shapes and dtypes of our state dict (encoder.*, head.*, probe.*), built on the meta device (no memory)."""
    with torch.device("meta"):
        modules = {"encoder": Encoder(cfg), "head": PretrainHead(cfg)}
        if probe_cfg is not None:
            modules["probe"] = ProbeHead(probe_cfg)
    return {f"{name}.{k}": (v.shape, v.dtype) for name, m in modules.items() for k, v in m.state_dict().items()}


def upstream_shapes(table: dict, ours: dict) -> dict[str, tuple[tuple, torch.dtype]]:
    """The inverse map: the shape each upstream key must have, from our shapes."""
    shapes = {}
    for key, (our_key, how, _) in table.items():
        if how == "drop":
            shapes[key] = ((), torch.float32)
            continue
        shape, dtype = ours[our_key]
        if how == "view":
            shape = (1, shape[0], 1)                     # upstream's [1, C, 1] affine
        elif how == "stack":
            shape = shape[1:]                            # one channel's row
        shapes[key] = (tuple(shape), dtype)
    return shapes


def convert(state: dict, table: dict, ours: dict, source: str) -> dict:
    """Upstream tensors → our state dict. Every key used, every expected key present, every shape as expected."""
    expected = upstream_shapes(table, ours)
    for key in state:
        if key not in table:
            fail(source, f"unexpected key {key!r} (not in the key table)")
    for key, (shape, _) in expected.items():
        if key not in state:
            fail(source, f"missing key {key!r}")
        if tuple(state[key].shape) != shape:
            fail(source, f"key {key!r} has shape {list(state[key].shape)}, expected {list(shape)}")
    converted, stacks = {}, {}
    for key, (our_key, how, c) in table.items():
        tensor = state[key].to(expected[key][1])
        if how == "copy":
            converted[our_key] = tensor.clone()
        elif how == "view":
            converted[our_key] = tensor.reshape(-1).clone()
        elif how == "stack":
            stacks.setdefault(our_key, {})[c] = tensor
    for our_key, rows in stacks.items():
        converted[our_key] = torch.stack([rows[c] for c in range(len(rows))])
    return converted


# ----------------------------------------------------------------------------------------------------------------------
# Sizes from the tensors


def infer_model_config(state: dict, hyper: dict, file, prefix: str) -> ModelConfig:
    """ModelConfig from an upstream encoder state dict (keys without `prefix`) and the checkpoint's hyper_parameters."""
    need(state, ("patch_encoder.W_P.0.weight", "pe.W_pos", "layers.0.ff.0.weight"), file, prefix)
    d_model, patch_len = state["patch_encoder.W_P.0.weight"].shape
    n_heads = hyper.get("n_heads") or heads_from_scale(state, d_model, file, prefix)
    cfg = ModelConfig(n_channels=count(state, r"patch_encoder\.W_P\.(\d+)\.weight"), patch_len=patch_len,
                      max_patches=state["pe.W_pos"].shape[0], d_model=d_model,
                      n_layers=count(state, r"layers\.(\d+)\.self_attn\.W_Q\.weight"), n_heads=int(n_heads),
                      d_ff=state["layers.0.ff.0.weight"].shape[0],
                      residual_attention=bool(hyper.get("res_attention", True)))   # not visible in the weights
    check_scales(state, cfg, file, prefix)
    check_hyper(hyper, file)
    return cfg


def infer_probe_config(state: dict, file, prefix: str) -> ProbeConfig:
    """ProbeConfig from an upstream probe state dict (keys without `prefix`): widths from the tensor shapes."""
    need(state, ("affine_weight", "rnn.weight_ih_l0", "rnn.weight_hh_l0", "layers.0.4.weight"), file, prefix)
    n_channels = state["affine_weight"].shape[1] if state["affine_weight"].dim() == 3 else 0
    input_size = state["rnn.weight_ih_l0"].shape[1]
    if n_channels == 0 or input_size % n_channels:
        fail(file, f"key {prefix + 'rnn.weight_ih_l0'!r} has shape {list(state['rnn.weight_ih_l0'].shape)}, "
                   f"which does not fit {prefix + 'affine_weight'!r} {list(state['affine_weight'].shape)}")
    return ProbeConfig(n_channels=n_channels, d_model=input_size // n_channels,
                       hidden_size=state["rnn.weight_hh_l0"].shape[1],
                       n_layers=count(state, r"rnn\.weight_ih_l(\d+)"), n_classes=state["layers.0.4.weight"].shape[0])


def fail(file, message: str):
    raise ImportFailure(f"import_upstream.py: {file}: {message}")


def count(state: dict, pattern: str) -> int:
    """1 + the largest index matched by pattern (a gap then shows up as a missing key)."""
    found = [int(m.group(1)) for k in state if (m := re.fullmatch(pattern, k))]
    return max(found) + 1 if found else 0


def need(state: dict, keys, file, prefix: str):
    for key in keys:
        if key not in state:
            fail(file, f"missing key {prefix + key!r}")


def heads_from_scale(state: dict, d_model: int, file, prefix: str) -> int:
    """The frozen scale is head_dim^-0.5, so head_dim = scale^-2."""
    need(state, ("layers.0.self_attn.sdp_attn.scale",), file, prefix)
    head_dim = round(float(state["layers.0.self_attn.sdp_attn.scale"]) ** -2)
    return d_model // max(head_dim, 1)


def check_scales(state: dict, cfg: ModelConfig, file, prefix: str):
    """Our attention uses head_dim^-0.5; a layer stored with another scale cannot be imported faithfully."""
    want = (cfg.d_model // cfg.n_heads) ** -0.5
    for i in range(cfg.n_layers):
        key = f"layers.{i}.self_attn.sdp_attn.scale"
        if key in state and state[key].numel() == 1 and abs(float(state[key]) - want) > 1e-6 * want:
            fail(file, f"key {prefix + key!r} is {float(state[key]):.6g}, expected {want:.6g} = "
                       f"(d_model / n_heads)^-0.5 with n_heads {cfg.n_heads}")


# upstream options our model does not implement: if the hyper_parameters say otherwise, the weights would load but
# compute a different function
PAPER_ONLY = {"use_revin": True, "affine": True, "dim1reduce": False, "shared_embedding": False, "norm": "BatchNorm",
              "pre_norm": False, "act": "gelu", "pos_encoding_type": "learned", "relative_attn_type": "vanilla",
              "time_domain": True}


def check_hyper(hyper: dict, file):
    for name, value in PAPER_ONLY.items():
        if name in hyper and hyper[name] != value:
            fail(file, f"hyper_parameters {name}={hyper[name]!r}: only {value!r} (the paper's) is supported")
    if "hop_length" in hyper and "win_length" in hyper and hyper["hop_length"] != hyper["win_length"]:
        fail(file, f"hop_length {hyper['hop_length']} != win_length {hyper['win_length']}: overlapping patches are "
                   "not supported")


# ----------------------------------------------------------------------------------------------------------------------
# Reading Lightning checkpoints without running their pickled code


class Opaque(dict):
    """Stands in for any pickled object outside the allow-list (optimizer/scheduler/callback state, Lightning's
    AttributeDict …): swallows its arguments and state, keeps dict items (so a dict subclass stays readable)."""

    def __init__(self, *args, **kwargs):
        super().__init__()

    def __setstate__(self, state):
        pass

    def append(self, item):
        pass

    def extend(self, items):
        pass


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only what tensors need; every other global becomes Opaque, so no code from the file runs."""
    ALLOWED = {("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"),
               ("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_parameter_with_state"),
               ("torch", "Size"), ("torch", "device"), ("builtins", "set"), ("builtins", "frozenset")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return Opaque


class restricted_pickle:
    """A pickle module for torch.load(pickle_module=...) whose Unpickler is the restricted one."""
    Unpickler = RestrictedUnpickler
    load = staticmethod(lambda f, **kw: RestrictedUnpickler(f, **kw).load())


def read_lightning(path: Path) -> tuple[dict, dict]:
    """(state_dict of tensors, hyper_parameters of plain values) from a Lightning checkpoint file."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # the file also pickles optimizer/scheduler/callback objects: read it again, keeping only tensors
        # (a restricted unpickler, never a plain weights_only=False)
        ckpt = torch.load(path, map_location="cpu", weights_only=False, pickle_module=restricted_pickle)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        fail(path, "not a Lightning checkpoint (no state_dict)")
    state = {k: v for k, v in ckpt["state_dict"].items() if isinstance(v, torch.Tensor)}
    for key in ckpt["state_dict"].keys() - state.keys():
        fail(path, f"key {key!r} is not a tensor")
    hyper = ckpt.get("hyper_parameters")
    hyper = {k: v for k, v in hyper.items() if isinstance(v, (int, float, bool, str))} if isinstance(hyper, dict) else {}
    return state, hyper


def split_prefixes(state: dict, prefixes: tuple[str, ...], source: str) -> list[dict]:
    """{prefix + key: tensor} → one dict per prefix, keys without it; a key under no prefix is an error."""
    parts = [{} for _ in prefixes]
    for key, value in state.items():
        index = next((j for j, p in enumerate(prefixes) if key.startswith(p)), None)
        if index is None:
            fail(source, f"unexpected key {key!r} (expected prefixes: {', '.join(prefixes)})")
        parts[index][key[len(prefixes[index]):]] = value
    return parts


# ----------------------------------------------------------------------------------------------------------------------
# The import


def import_checkpoints(encoder_path: Path | None, probe_path: Path | None) -> tuple[dict, dict]:
    """(config dict for config.yaml, our state dict) from the upstream files."""
    if encoder_path is None and probe_path is None:
        raise ImportFailure("import_upstream.py: give --encoder, --probe or both")
    weights, cfg, probe_cfg = {}, None, None
    if encoder_path is not None:
        state, hyper = read_lightning(encoder_path)
        (encoder_state,) = split_prefixes(state, ("model.",), str(encoder_path))
        cfg = infer_model_config(encoder_state, hyper, encoder_path, "model.")
        table = prefixed("model.", encoder_table(cfg, with_head=True))
        weights = convert(state, table, our_shapes(cfg), str(encoder_path))
    if probe_path is not None:
        state, _ = read_lightning(probe_path)
        encoder_state, probe_state = split_prefixes(state, ("encoder.model.", "feedforward."), str(probe_path))
        # n_heads and res_attention are hyper_parameters of the encoder file; without it: the scale, and the default
        known = {"n_heads": cfg.n_heads, "res_attention": cfg.residual_attention} if cfg else {}
        classifier_cfg = infer_model_config(encoder_state, known, probe_path, "encoder.model.")
        probe_cfg = infer_probe_config(probe_state, probe_path, "feedforward.")
        if (probe_cfg.n_channels, probe_cfg.d_model) != (classifier_cfg.n_channels, classifier_cfg.d_model):
            fail(probe_path, f"the probe reads {probe_cfg.n_channels} × {probe_cfg.d_model} embeddings, its encoder "
                             f"gives {classifier_cfg.n_channels} × {classifier_cfg.d_model}")
        table = prefixed("encoder.model.", encoder_table(classifier_cfg, with_head=False))
        table |= prefixed("feedforward.", probe_table(probe_cfg))
        converted = convert(state, table, our_shapes(classifier_cfg, probe_cfg), str(probe_path))
        if cfg is not None:
            compare_encoders(weights, converted, cfg, classifier_cfg)
        # the classifier's copy of the encoder is the one its probe was trained on; only the encoder file has the head
        weights = {k: v for k, v in weights.items() if k.startswith("head.")} | converted
        cfg = classifier_cfg
    config = {"model": dataclasses.asdict(cfg)}
    if probe_cfg is not None:
        config["probe"] = dataclasses.asdict(probe_cfg)
    return config, weights


def prefixed(prefix: str, table: dict) -> dict:
    return {prefix + key: value for key, value in table.items()}


def compare_encoders(from_encoder: dict, from_classifier: dict, cfg: ModelConfig, classifier_cfg: ModelConfig):
    """The two files should carry the same encoder (the probe was trained on a frozen copy); say so if not."""
    if cfg != classifier_cfg:
        warnings.warn(f"the classifier's encoder ({classifier_cfg}) differs in size from the encoder file's ({cfg}); "
                      "using the classifier's")
        return
    worst, where = 0.0, None
    for key, value in from_classifier.items():
        if key.startswith("encoder."):
            diff = (value.double() - from_encoder[key].double()).abs().max().item() if value.numel() else 0.0
            if diff > worst:
                worst, where = diff, key
    if where is not None:
        warnings.warn(f"the classifier's encoder differs from the encoder file's (max |diff| {worst:.3g} at {where}); "
                      "using the classifier's")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="import_upstream.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", type=Path, help="upstream pretraining checkpoint (pft_sleep_encoder.ckpt)")
    parser.add_argument("--probe", type=Path, help="upstream classifier checkpoint (pft_sleep_classifier.ckpt)")
    parser.add_argument("--run-dir", "--run", dest="run", type=Path, required=True,
                        help="run folder to write (config.yaml + ckpt_final.pt)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run in --run")
    args = parser.parse_args(argv)
    for path in (args.encoder, args.probe):
        if path is not None and not path.is_file():
            fail(path, "no such file")
    config, weights = import_checkpoints(args.encoder, args.probe)
    try:
        runs.write_run(args.run, config, weights, args.overwrite)
    except FileExistsError as err:
        raise ImportFailure(f"import_upstream.py: {err}") from None
    n_params = sum(v.numel() for k, v in weights.items() if "running_" not in k and "num_batches" not in k)
    print(f"wrote {args.run}: encoder {config['model']['n_channels']} channels × {config['model']['max_patches']} "
          f"patches of {config['model']['patch_len']}, d_model {config['model']['d_model']}, "
          f"{config['model']['n_layers']} layers × {config['model']['n_heads']} heads"
          + (", pretrain head" if any(k.startswith("head.") for k in weights) else "")
          + (f", probe ({config['probe']['n_classes']} classes)" if "probe" in config else "")
          + f"; {n_params:,} parameters in all")


if __name__ == "__main__":
    main()
