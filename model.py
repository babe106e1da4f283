"""The PFTSleep model: a patch transformer over full-night, 7-channel PSG, and the probe that reads sleep stages off it.

Fox et al., SLEEP 2025. With the default configs this computes the same function as the public implementation
(benmfox/PFTSleep: `PatchTFTSimple` + `RNNProbingHeadExperimental`; docs/upstream.md §6), so the published
checkpoints load through a key map. Everything else (SDPA attention, padding-aware RevIN) is a switch. Torch only:
fast CPU kernels for staging are cpu_kernels.py's, passed in explicitly (`kernels=`).

Shape flow (paper config; B nights, C = 7 channels, T = 8 h · 3600 · 125 = 3,600,000 samples):

    signals [B, C, T] ──RevIN──► [B, C, T] ──patchify──► patches [B, C, N, P]    N = T // P = 4800, P = 750 (6 s)
      ──per-channel Linear(P→D) + learned position──► [B, C, N, D]                D = 512
      ──each channel its own sequence──► [B·C, N, D] ──3 × post-norm transformer layer──► embeddings [B, C, N, D]
    pretraining:  PretrainHead   [B, C, N, D] ──per-channel Linear(D→P)──► reconstruction [B, C, N, P] (vs. the patches)
    sleep stages: ProbeHead      [B, C, N, D] ──[B, N, C·D]──BiGRU──MLP──► [B, N, 5] ──mean of 5 patches──► [B, N/5, 5]

Other lengths use the first N rows of the positional table. Upstream's outputs are [B, C, D, N], [B, N, C, P],
[B, classes, N/5]; ours [B, C, N, D], [B, C, N, P], [B, N/5, classes].
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


@dataclass
class ModelConfig:
    n_channels: int = 7                  # ECG, EOG, EMG, EEG, SPO2, THOR, ABDO
    patch_len: int = 750                 # 6 s at 125 Hz; 5 patches = one 30-s epoch
    max_patches: int = 4800              # rows of the learned positional table (8 h)
    d_model: int = 512                   # embedding width
    n_layers: int = 3                    # transformer layers
    n_heads: int = 4                     # attention heads (head dim d_model / n_heads)
    d_ff: int = 2048                     # feed-forward width
    dropout: float = 0.1                 # dropout on embeddings, attention output and feed-forward
    residual_attention: bool = True      # each layer adds the previous layer's pre-softmax scores to its own
    attention: str = "sdpa"              # "sdpa" (F.scaled_dot_product_attention) | "math" (explicit scores: reference)
    attention_kernels: str = "no_cudnn"  # SDPA kernels allowed: "no_cudnn" (flash, efficient, math) | "torch" (all) | "efficient" | "math"
    revin_stats: str = "window"          # "window" (upstream: padding enters mean/std) | "valid" (padding excluded)
    revin_eps: float = 1e-5              # added to the RevIN standard deviation

    def __post_init__(self):            # a config mistake: one line, before anything is built or written
        if self.d_model % self.n_heads:
            raise SystemExit(f"config: model.n_heads {self.n_heads} must divide model.d_model {self.d_model}")
        for name, allowed in (("attention", ("sdpa", "math")), ("attention_kernels", tuple(ATTENTION_KERNELS)),
                              ("revin_stats", ("window", "valid"))):
            if getattr(self, name) not in allowed:
                raise SystemExit(f"config: model.{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")


@dataclass
class ProbeConfig:                       # upstream's paper values (tc:164-183), not its class defaults
    kind: str = "gru"                    # "gru": the paper's | "linear": one Linear(C·D→classes) per patch
    n_channels: int = 7
    d_model: int = 512
    hidden_size: int = 1024
    n_layers: int = 2
    dropout: float = 0.1                 # between GRU layers
    linear_dropout: float = 0.1          # in the MLP
    n_classes: int = 5                   # 0 W, 1 N1, 2 N2, 3 N3, 4 REM
    patches_per_epoch: int = 5           # 5 × 6 s = 30 s


# ----------------------------------------------------------------------------------------------------------------------
# Attention

# model.attention_kernels -> the SDPA kernels allowed, math always last (the CPU has flash and math only). cuDNN is left
# out by default: with a mask at sequence lengths ≡ 64 mod 128 (4,800 is) some cuDNN versions give NaN gradients.
ATTENTION_KERNELS = {
    "no_cudnn": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    "torch": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    "math": [SDPBackend.MATH],
}


class SelfAttention(nn.Module):
    """Multi-head self-attention over one channel's patches, with residual attention (He et al. 2020, RealFormer):
    layer ℓ's pre-softmax scores are Σ_{j≤ℓ} s·q_j·k_jᵀ. The "math" path materialises them [S, H, N, N] and hands them
    on, as upstream. The "sdpa" path never does: they are one dot product between [s·q_1 | … | s·q_ℓ] and
    [k_1 | … | k_ℓ] (per head), handed on, and SDPA runs with scale 1 on head dims d → 2d → 3d over the layers, values
    keeping d. `kernels` (cpu_kernels) replaces the products and the attention by its own, the same function."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.path = cfg.n_heads, cfg.d_model // cfg.n_heads, cfg.attention
        self.scale = self.head_dim ** -0.5
        self.backends = ATTENTION_KERNELS[cfg.attention_kernels]
        self.residual_attention = cfg.residual_attention
        self.query, self.key, self.value, self.out = (nn.Linear(cfg.d_model, cfg.d_model) for _ in range(4))
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, key_padding: Tensor | None, prev=None, kernels=None):
        """x [S, N, D] (S = B·C), key_padding [S, N] or None, prev: the last layer's carry -> (out [S, N, D], carry)"""
        S, N, D = x.shape
        linear = kernels.linear if kernels else F.linear
        # head h owns features h·d … h·d+d-1 (upstream's split)
        q, k, v = (linear(x, proj.weight, proj.bias).view(S, N, self.n_heads, self.head_dim).transpose(1, 2)
                   for proj in (self.query, self.key, self.value))                     # [S, H, N, d] each
        if kernels:
            out, carry = kernels.attention(self, q, k, v, key_padding, prev)             # [S, H, N, d]
        else:
            attend = self.math_attention if self.path == "math" else self.sdpa_attention
            out, carry = attend(q, k, v, key_padding, prev)                              # [S, H, N, d]
        out = out.transpose(1, 2).reshape(S, N, D)                                       # [S, N, H·d] head-major
        return self.dropout(linear(out, self.out.weight, self.out.bias)), (carry if self.residual_attention else None)

    def math_attention(self, q, k, v, key_padding, prev_scores):
        """The reference: explicit scores, as upstream. Hands on the accumulated, masked pre-softmax scores."""
        scores = (q @ k.transpose(-2, -1)) * self.scale                                  # [S, H, N, N]
        scores = scores if prev_scores is None else scores + prev_scores
        if key_padding is not None:
            # an all-padded sequence gets no -inf, so softmax stays finite; zeroed below (output 0, as upstream)
            ignored = key_padding & ~key_padding.all(-1, keepdim=True)                   # [S, N]
            scores = scores.masked_fill(ignored[:, None, None, :], float("-inf"))
        weights = scores.softmax(dim=-1)                                                 # [S, H, N, N]
        if key_padding is not None:
            weights = weights.masked_fill(key_padding[:, None, None, :], 0.0)
        return weights @ v, scores

    def widened(self, q, k, prev_qk):
        """The sdpa path's carry: this layer's scaled queries and keys [S, H, N, d] after the earlier ones' [.., ℓ·d]"""
        q = q * self.scale
        return (q, k) if prev_qk is None else (torch.cat([prev_qk[0], q], dim=-1), torch.cat([prev_qk[1], k], dim=-1))

    def sdpa_attention(self, q, k, v, key_padding, prev_qk):
        """Fused attention; residual attention through query/key concatenation (class docstring)."""
        q, k = self.widened(q, k, prev_qk)                                               # [S, H, N, ℓ·d] each
        attn_mask, all_padded = None, None
        if key_padding is not None:
            # True = attend. Fully padded sequences attend everywhere (SDPA would give NaN) and are zeroed below.
            all_padded = key_padding.all(-1)                                             # [S]
            attn_mask = (~key_padding | all_padded[:, None])[:, None, None, :]           # [S, 1, 1, N]
        width = v.shape[-1]
        pad = v_padding(self.backends, q.device.type, q.dtype, q.shape[-1], width, masked=attn_mask is not None)
        padded_v = F.pad(v, (0, pad)) if pad else v                                      # [S, H, N, d + pad]
        with sdpa_kernel(self.backends):
            out = F.scaled_dot_product_attention(q, k, padded_v, attn_mask=attn_mask, scale=1.0)[..., :width]  # [S, H, N, d]
        if all_padded is not None:
            out = out.masked_fill(all_padded[:, None, None, None], 0.0)
        return out, (q, k)


def v_padding(kernels: list, device_type: str, dtype: torch.dtype, qk_width: int, v_width: int, masked: bool) -> int:
    """Zero columns to append to v (d wide) so that FlashAttention can take a layer of wider q and k (ℓ·d): it needs
    one head dim for all three and runs on CUDA in half precision, without a mask, up to 256. Elsewhere v keeps its
    width: the memory-efficient kernel and math take it narrower, at no wasted work."""
    flash = (SDPBackend.FLASH_ATTENTION in kernels and device_type == "cuda" and not masked
             and dtype in (torch.float16, torch.bfloat16) and qk_width <= 256)
    return qk_width - v_width if flash else 0


# ----------------------------------------------------------------------------------------------------------------------
# Encoder


class EncoderLayer(nn.Module):
    """Post-norm layer, BatchNorm over all S·N tokens (padding included; training.SyncedBatchNorm under DDP). Dropout
    as upstream: attention after its projection and on the residual add, the FFN after its GELU and on the add."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn = SelfAttention(cfg)
        self.norm_attn = nn.BatchNorm1d(cfg.d_model)
        self.ff_in, self.ff_out = nn.Linear(cfg.d_model, cfg.d_ff), nn.Linear(cfg.d_ff, cfg.d_model)
        self.norm_ff = nn.BatchNorm1d(cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, key_padding: Tensor | None, prev=None, kernels=None):
        """x [S, N, D] -> (x [S, N, D], what the next layer's attention needs for residual attention)"""
        S, N, D = x.shape
        attended, prev = self.attn(x, key_padding, prev, kernels)                        # [S, N, D]
        x = self.norm_attn((x + self.dropout(attended)).view(S * N, D)).view(S, N, D)
        fed = kernels.feed_forward(self, x) if kernels else self.feed_forward(x)         # [S, N, D]
        return self.norm_ff((x + self.dropout(fed)).view(S * N, D)).view(S, N, D), prev

    def feed_forward(self, x: Tensor, linear=F.linear) -> Tensor:
        """x [S, n, D] -> [S, n, D]; exact (erf) GELU as upstream"""
        hidden = F.gelu(linear(x, self.ff_in.weight, self.ff_in.bias))                  # [S, n, d_ff]
        return linear(self.dropout(hidden), self.ff_out.weight, self.ff_out.bias)


def revin_statistics(signals: Tensor, valid: Tensor | None, eps: float, length: int = 0) -> tuple[Tensor, Tensor]:
    """Per night and channel mean and population std + eps (eps added to the std, not under the root), detached.
    signals [B, C, T], valid [B, 1, T] bool or None (None: over the whole window; length > T: as if zero-padded to
    `length` samples, stage.py's truncated windows) -> mean, std [B, C, 1]."""
    signals = signals.detach()
    if valid is None and length > signals.shape[-1]:                  # the zeros add (length - T)·mean² to the squares
        mean = signals.sum(dim=-1, keepdim=True) / length
        squares = ((signals - mean) ** 2).sum(dim=-1, keepdim=True) + (length - signals.shape[-1]) * mean ** 2
        return mean, (squares / length).sqrt() + eps
    if valid is None:
        mean = signals.mean(dim=-1, keepdim=True)
        std = signals.std(dim=-1, keepdim=True, correction=0)
    else:
        count = valid.sum(dim=-1, keepdim=True).clamp_min(1)                              # [B, 1, 1]
        mean = (signals * valid).sum(dim=-1, keepdim=True) / count
        std = (((signals - mean) * valid) ** 2).sum(dim=-1, keepdim=True).div(count).sqrt()
    return mean, std + eps


class Encoder(nn.Module):
    """RevIN → patches → per-channel Linear(P→D) + learned positions → channel-independent transformer."""

    def __init__(self, cfg: ModelConfig = ModelConfig()):
        super().__init__()
        self.cfg = cfg
        C, P, D = cfg.n_channels, cfg.patch_len, cfg.d_model
        self.revin_weight = nn.Parameter(torch.ones(C))                                 # RevIN affine, per channel
        self.revin_bias = nn.Parameter(torch.zeros(C))
        # one Linear(P→D) per channel, stacked: patch_weight[c] is upstream's patch_encoder.W_P.{c}.weight
        self.patch_weight = nn.Parameter(torch.empty(C, D, P))
        self.patch_bias = nn.Parameter(torch.empty(C, D))
        self.pos_embed = nn.Parameter(torch.empty(cfg.max_patches, D))
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_layers))
        init_stacked_linear(self.patch_weight, self.patch_bias, fan_in=P)
        nn.init.uniform_(self.pos_embed, -0.02, 0.02)                                   # as upstream

    def patchify(self, signals: Tensor, padding_mask: Tensor | None = None, window: int = 0) -> tuple[Tensor, Tensor | None]:
        """signals [B, C, T] float32, padding_mask [B, T] bool (True = padded) or None -> normalised patches
        [B, C, N, P] (N = T // P; the reconstruction target), key_padding [B, N] bool (True = fully padded) or None.
        window > T: windows zero-padded to `window` samples, the padded patches left out (exact in eval mode)."""
        B, C, T = signals.shape
        P = self.cfg.patch_len
        # upstream cuts inputs longer than its window to max_patches patches (after taking the statistics)
        N = min(T // P, self.cfg.max_patches)
        if N == 0:
            raise ValueError(f"input of {T} samples is shorter than one patch ({P})")
        valid = None if padding_mask is None or self.cfg.revin_stats == "window" else ~padding_mask[:, None, :]  # [B, 1, T]
        length = window if self.cfg.revin_stats == "window" else 0
        mean, std = revin_statistics(signals, valid, self.cfg.revin_eps, length)         # [B, C, 1] each
        # (x - mean) / std · weight + bias, as one new [B, C, T] tensor: a night's signals are large
        x = (signals - mean).mul_(self.revin_weight[:, None] / std).add_(self.revin_bias[:, None])   # [B, C, T]
        if valid is not None:
            x.masked_fill_(~valid, 0.0)      # padded content then never reaches the encoder, even in a partial patch
        patches = x[..., :N * P].reshape(B, C, N, P)                                     # [B, C, N, P]
        key_padding = None if padding_mask is None else padding_mask[:, :N * P].reshape(B, N, P).all(dim=-1)  # [B, N]
        return patches, key_padding

    def tokens(self, patches: Tensor) -> Tensor:
        """patches [B, C, N, P] -> per-channel Linear(P→D) + learned position [B, C, N, D]."""
        x = torch.einsum("bcnp,cdp->bcnd", patches, self.patch_weight)                   # [B, C, N, D]
        return self.dropout(x.add_(self.patch_bias[:, None, :]).add_(self.pos_embed[:patches.shape[2]]))

    def contextualise(self, tokens: Tensor, key_padding: Tensor | None = None, kernels=None) -> Tensor:
        """tokens [B, C, N, D], key_padding [B, N] bool or None -> embeddings [B, C, N, D]. With `kernels` (cpu_kernels)
        kernels.SEQUENCES_PER_PASS channel sequences a pass, each replacing its tokens in place (exact in eval mode)."""
        B, C, N, D = tokens.shape
        x = tokens.reshape(B * C, N, D)                   # [B·C, N, D]: every channel its own sequence, row b·C + c
        key_padding = None if key_padding is None else key_padding.repeat_interleave(C, dim=0)   # [B·C, N]
        if not kernels:
            return self.transform(x, key_padding).view(B, C, N, D)                       # [B, C, N, D]
        for i in range(0, B * C, kernels.SEQUENCES_PER_PASS):
            rows = x[i:i + kernels.SEQUENCES_PER_PASS]                                   # [n, N, D], a view of x
            rows.copy_(self.transform(rows, None if key_padding is None else key_padding[i:i + len(rows)], kernels))
        return x.view(B, C, N, D)                                                        # [B, C, N, D]

    def transform(self, x: Tensor, key_padding: Tensor | None, kernels=None) -> Tensor:
        """The transformer layers: x [S, N, D], key_padding [S, N] or None -> [S, N, D]."""
        prev = None
        for layer in self.layers:
            x, prev = layer(x, key_padding, prev, kernels)                               # [S, N, D]
        return x

    def embed(self, signals: Tensor, padding_mask: Tensor | None = None, kernels=None) -> Tensor:
        """signals [B, C, T] float32, padding_mask [B, T] bool (True = padded) or None -> embeddings [B, C, N, D]."""
        patches, key_padding = self.patchify(signals, padding_mask)                      # [B, C, N, P], [B, N]
        return self.contextualise(self.tokens(patches), key_padding, kernels)


def init_stacked_linear(weight: Tensor, bias: Tensor, fan_in: int):
    """nn.Linear's default init (U(±1/√fan_in) for weight and bias), for per-channel weights stacked on dim 0."""
    bound = 1 / math.sqrt(fan_in)
    nn.init.uniform_(weight, -bound, bound)
    nn.init.uniform_(bias, -bound, bound)


class PretrainHead(nn.Module):
    """Per-channel Linear(D→P): embeddings [B, C, N, D] -> reconstruction of the normalised patches [B, C, N, P]."""

    def __init__(self, cfg: ModelConfig = ModelConfig()):
        super().__init__()
        C, P, D = cfg.n_channels, cfg.patch_len, cfg.d_model
        self.weight = nn.Parameter(torch.empty(C, P, D))   # weight[c] is upstream's head.W_P.{c}.weight
        self.bias = nn.Parameter(torch.empty(C, P))
        init_stacked_linear(self.weight, self.bias, fan_in=D)

    def forward(self, embeddings: Tensor) -> Tensor:
        return torch.einsum("bcnd,cpd->bcnp", embeddings, self.weight) + self.bias[:, None, :]   # [B, C, N, P]


class ProbeHead(nn.Module):
    """Stages from frozen embeddings: per-channel affine → channels concatenated per patch → 2-layer BiGRU (kernels:
    cpu_kernels') → MLP per patch (kind "linear": one linear map) → logits averaged over each epoch's 5 patches."""

    def __init__(self, cfg: ProbeConfig = ProbeConfig()):
        super().__init__()
        self.cfg, H = cfg, cfg.hidden_size
        self.channel_weight = nn.Parameter(torch.ones(cfg.n_channels))
        self.channel_bias = nn.Parameter(torch.zeros(cfg.n_channels))
        assert cfg.kind in ("gru", "linear"), cfg.kind
        if cfg.kind == "linear":
            self.linear = nn.Linear(cfg.n_channels * cfg.d_model, cfg.n_classes)
            return
        self.gru = nn.GRU(cfg.n_channels * cfg.d_model, H, num_layers=cfg.n_layers, batch_first=True,
                          dropout=cfg.dropout, bidirectional=True)
        # indices 0, 1, 4 match upstream's layers.0.{0,1,4}
        self.mlp = nn.Sequential(nn.Linear(2 * H, H), nn.LayerNorm(H), nn.ReLU(), nn.Dropout(cfg.linear_dropout),
                                 nn.Linear(H, cfg.n_classes))

    def forward(self, embeddings: Tensor, padding_mask: Tensor | None = None, kernels=None) -> Tensor:
        """embeddings [B, C, N, D], padding_mask [B, T] bool or None -> logits [B, N // 5, classes]; kernels: cpu_kernels"""
        B, C, N, D = embeddings.shape
        x = embeddings.transpose(1, 2).reshape(B, N, C * D)       # [B, N, C·D], channel-major (feature c·D + d)
        x = x.mul_(self.channel_weight.repeat_interleave(D)).add_(self.channel_bias.repeat_interleave(D))   # in place
        if self.cfg.kind == "linear":
            logits = self.linear(x)                                                      # [B, N, classes]
        elif kernels:
            lengths = [N] * B if padding_mask is None else valid_lengths(padding_mask, N).tolist()
            logits = self.mlp(kernels.bidirectional_gru(self.gru, x, lengths))          # [B, N, classes]
        else:   # the GRU in fp32: under bf16 autocast cuDNN would run it in fp16, nothing scaling its small gradients
            with torch.autocast(x.device.type, enabled=False):
                logits = self.mlp(self.recurrent(x.float(), padding_mask))              # [B, N, classes]
        k, E = self.cfg.patches_per_epoch, N // self.cfg.patches_per_epoch
        return logits[:, :E * k].reshape(B, E, k, -1).mean(dim=2)                        # [B, E, classes]

    def recurrent(self, x: Tensor, padding_mask: Tensor | None) -> Tensor:
        """The BiGRU over the night, x [B, N, C·D] -> [B, N, 2H]. Only trailing padding is honoured (as upstream): the
        backward GRU starts at the last valid patch, zeros past each length (they still go through the MLP)."""
        if padding_mask is None:
            return self.gru(x)[0]
        packed = pack_padded_sequence(x, valid_lengths(padding_mask, x.shape[1]).cpu(), batch_first=True,
                                      enforce_sorted=False)
        return pad_packed_sequence(self.gru(packed)[0], batch_first=True, total_length=x.shape[1])[0]


def valid_lengths(padding_mask: Tensor, n_patches: int) -> Tensor:
    """padding_mask [B, T] -> patches before the trailing fully padded ones [B]; all N for an all-padded night."""
    B, T = padding_mask.shape
    P = T // n_patches                                                                   # as upstream
    padded = padding_mask[:, :n_patches * P].reshape(B, n_patches, P).all(dim=-1)         # [B, N]
    lengths = n_patches - padded.flip(1).int().cumprod(dim=1).sum(dim=1)                 # [B]: minus trailing padding
    return torch.where(lengths == 0, n_patches, lengths)


# ----------------------------------------------------------------------------------------------------------------------
# Pretraining: corruption and loss


def corrupt_values(patches: Tensor, p_zero: float = 0.05, p_jitter: float = 0.05, jitter_scale: float = 0.1,
                   generator: torch.Generator | None = None) -> Tensor:
    """Upstream's corruption ('jitter_zero_mask', mask_ratio 0.1), element-wise: every value is zeroed with probability
    p_zero and, independently, gets ε·jitter_scale·max|x| (ε ~ N(0, 1), max over the whole batch) added with
    probability p_jitter; zeroed first, then jittered. Any shape."""
    scale = patches.detach().abs().max() * jitter_scale
    draw = lambda sample: sample(patches.shape, generator=generator, device=patches.device)  # noqa: E731
    keep, jitter, noise = draw(torch.rand) > p_zero, draw(torch.rand) > 1 - p_jitter, draw(torch.randn) * scale
    return patches * keep + jitter * noise


def mask_patches(patches: Tensor, mask_ratio: float, key_padding: Tensor | None = None,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """MAE-style option: zero whole (b, c, n) patches with probability mask_ratio, never padded ones.
    patches [B, C, N, P], key_padding [B, N] or None -> (corrupted [B, C, N, P], mask [B, C, N] bool, True = masked)."""
    B, C, N, P = patches.shape
    mask = torch.rand((B, C, N), generator=generator, device=patches.device) < mask_ratio     # [B, C, N]
    if key_padding is not None:
        mask &= ~key_padding[:, None, :]
    return patches.masked_fill(mask[..., None], 0.0), mask


def reconstruction_loss(reconstruction: Tensor, target: Tensor, key_padding: Tensor | None = None,
                        loss_mask: Tensor | None = None) -> Tensor:
    """Mean squared error over the values of all non-padded patches (upstream, tt:205); with loss_mask [B, C, N] bool, only
    over those patches too. reconstruction, target [B, C, N, P], key_padding [B, N] bool or None -> scalar."""
    B, C, N, P = target.shape
    target = target.detach()   # as upstream: no gradient through the target (else RevIN's affine could shrink it)
    squared_error = (reconstruction - target).pow(2).sum(dim=-1)                      # [B, C, N]
    counted = torch.ones((B, C, N), dtype=torch.bool, device=target.device)
    if key_padding is not None:
        counted &= ~key_padding[:, None, :]
    if loss_mask is not None:
        counted = counted & loss_mask
    # where() rather than a product, so that non-finite predictions at ignored patches cannot leak in
    total = torch.where(counted, squared_error, 0.0).sum()
    return total / (counted.sum() * P).clamp_min(1)


@dataclass
class PretrainConfig:
    corruption: str = "jitter_zero"      # "jitter_zero" (upstream: element-wise zero + jitter) | "patch_mask" (MAE-style)
    p_zero: float = 0.05                 # jitter_zero: probability that a value is zeroed
    p_jitter: float = 0.05               # jitter_zero: probability that a value gets Gaussian jitter
    jitter_scale: float = 0.1            # jitter_zero: jitter std as a fraction of the batch's max |value|
    mask_ratio: float = 0.4              # patch_mask: fraction of (night, channel, patch) patches zeroed; loss on those


class Pretrainer(nn.Module):
    """Encoder + pretrain head; forward returns the reconstruction loss, so that DDP wraps one module."""

    def __init__(self, cfg: ModelConfig, objective: PretrainConfig = PretrainConfig()):
        super().__init__()
        assert objective.corruption in ("jitter_zero", "patch_mask"), objective.corruption
        self.objective = objective
        self.encoder = Encoder(cfg)
        self.head = PretrainHead(cfg)

    def forward(self, signals: Tensor, padding_mask: Tensor | None = None, present: Tensor | None = None) -> Tensor:
        """signals [B, C, T], padding_mask [B, T] bool or None, present [B, C] bool or None (None: all) -> scalar loss.
        Corruption in training mode only. An absent channel (zeros) is encoded, as when staging, but not scored."""
        patches, key_padding = self.encoder.patchify(signals, padding_mask)              # [B, C, N, P], [B, N]
        B, C, N, _ = patches.shape
        corrupted, loss_mask = patches, None
        o = self.objective
        if self.training and o.corruption == "jitter_zero":
            corrupted = corrupt_values(patches, o.p_zero, o.p_jitter, o.jitter_scale)
        elif self.training:
            corrupted, loss_mask = mask_patches(patches, o.mask_ratio, key_padding)
        if present is not None:
            counted = present[:, :, None].expand(B, C, N)                                # [B, C, N]
            loss_mask = counted if loss_mask is None else loss_mask & counted
        reconstruction = self.head(self.encoder.contextualise(self.encoder.tokens(corrupted), key_padding))
        return reconstruction_loss(reconstruction, patches, key_padding, loss_mask)
