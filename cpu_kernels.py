"""Fast CPU kernels for staging: the same function as model.py's reference paths, without autograd, in less time and
memory on a CPU. The caller chooses them explicitly: model.py's modules take `kernels=cpu_kernels` (this module) and
use its functions instead of their own; stage.stage_night passes it by default on the CPU (bench/predict.py, and
tests/test_model.py compares the two). Eval mode and torch.inference_mode() only.

- linear: the fp32 products through oneDNN rather than MKL: on AMD CPUs MKL keeps to its AVX2 kernels, oneDNN uses
  AVX-512 where the CPU has it (bench/gemm.py: about twice as fast there, about the same with AVX2 only);
- attention: SelfAttention's function a block of QUERY_BLOCK queries of one head at a time, residual attention by
  adding each layer's scores to the last layer's, kept (a quarter fewer products than concatenated queries and keys);
- feed_forward: FF_ROWS patches at a time, so the [S, N, d_ff] hidden layer is never whole;
- bidirectional_gru: each GRU layer's input gates for the whole night in one product, then its two directions'
  recurrences side by side in two threads (a recurrent step is a matrix-vector product bound by memory);
- the encoder runs one channel sequence per pass (SEQUENCES_PER_PASS), each replacing its tokens in place.
"""
from __future__ import annotations

import itertools
import math
import mmap
import platform
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import Tensor

QUERY_BLOCK = 480                        # attention's queries per product (bench/predict.py; 4800 = 10 · 480)
FF_ROWS = 600                            # the feed-forward layer's patches per product
SEQUENCES_PER_PASS = 1                   # channel sequences per pass of the encoder's layers
NEG_INF = torch.tensor(float("-inf"))         # a padded key's score
WORKSPACE = threading.local()            # per thread: buffers reused from pass to pass (kept_scores)
# oneDNN rather than MKL for the fp32 products, on x86, where it was measured (bench/gemm.py)
ONEDNN = (platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
          and hasattr(torch.ops.mkldnn, "_linear_pointwise"))     # registered by every x86 build since torch 2.0


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias), through oneDNN for fp32 on the CPU (ONEDNN); still fp32 throughout. Operands are
    made contiguous first: oneDNN's kernel for strided ones is slow."""
    if ONEDNN and x.dtype == torch.float32 and x.device.type == "cpu":
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight.contiguous(), bias, "none", [], "")
    return F.linear(x, weight, bias)


def attention(attn, q: Tensor, k: Tensor, v: Tensor, key_padding: Tensor | None, prev_scores: Tensor | None):
    """model.SelfAttention's function for module `attn`, QUERY_BLOCK queries of one head at a time, so that no [N, N]
    product is made whole. Residual attention keeps the pre-softmax scores [S, H, N, N] (fp32) and adds the next
    layer's s·q·kᵀ to them: one product of head width d per layer, where the sdpa path's concatenated queries and keys
    cost ℓ·d at layer ℓ (a quarter of an 8-h night's products). q, k, v [S, H, N, d], key_padding [S, N] or None,
    prev_scores: the last layer's carry -> (out [S, H, N, d], carry: the scores). Padding as math_attention."""
    S, H, N, _ = q.shape
    q, k = (q * attn.scale).contiguous(), k.contiguous()                             # [S, H, N, d] each
    v_rows = v.transpose(-2, -1).contiguous()                       # [S, H, d, N]: weights·v as a linear map of weights
    out = torch.empty_like(v)                                                        # [S, H, N, d]
    scores = kept_scores(S, H, N, N) if prev_scores is None else prev_scores         # [S, H, N, N]
    weights = q.new_empty(min(QUERY_BLOCK, N), N)                                    # [b, N], reused
    for s in range(S):
        padded = None if key_padding is None or not key_padding[s].any() else key_padding[s]   # [N]
        if padded is not None and padded.all():
            out[s] = 0                                                 # an all-padded sequence: output 0, as upstream
            continue
        for h, i in itertools.product(range(H), range(0, N, QUERY_BLOCK)):
            block = scores[s, h, i:i + QUERY_BLOCK]                                      # [b, N], kept for the next layer
            fresh = linear(q[s, h, i:i + QUERY_BLOCK], k[s, h])                          # [b, N]
            block.copy_(fresh) if prev_scores is None else block.add_(fresh)
            w = weights[:len(block)]
            masked = block if padded is None else torch.where(padded, NEG_INF, block, out=w)
            out[s, h, i:i + QUERY_BLOCK] = linear(torch.softmax(masked, dim=-1, out=w), v_rows[s, h])   # [b, d]
    return out, scores


def kept_scores(*shape: int) -> Tensor:
    """This thread's buffer for attention's kept scores, float32 of `shape`, uninitialised: one [S, H, N, N] buffer
    (368 MB for a channel sequence of 8 h) reused by every pass until release(), since fresh memory costs as much to
    touch as the products save; in anonymous memory that Linux may back with 2-MB pages (MADV_HUGEPAGE)."""
    size = math.prod(shape)
    buffer = getattr(WORKSPACE, "scores", None)
    if buffer is None or buffer.numel() < size:
        WORKSPACE.scores = None                                                      # the old one freed first
        if hasattr(mmap, "MADV_HUGEPAGE"):                   # Linux; private, as shared memory gets no 2-MB pages
            area = mmap.mmap(-1, size * 4, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            area.madvise(mmap.MADV_HUGEPAGE)
            buffer = torch.frombuffer(area, dtype=torch.float32)                    # holds the map while in use
        else:
            buffer = torch.empty(size)
        WORKSPACE.scores = buffer
    return buffer[:size].view(shape)


def release() -> None:
    """Frees this thread's buffers (kept_scores): stage.stage_night calls it after each window's encoder."""
    WORKSPACE.scores = None


def feed_forward(layer, x: Tensor) -> Tensor:
    """model.EncoderLayer.feed_forward over FF_ROWS patches at a time (row by row is exact): x [S, N, D] -> [S, N, D]."""
    return torch.cat([layer.feed_forward(rows, linear) for rows in x.split(FF_ROWS, dim=1)], dim=1)


def bidirectional_gru(gru: torch.nn.GRU, x: Tensor, lengths: list[int]) -> Tensor:
    """nn.GRU's output [B, N, 2H] for x [B, N, I], by torch's GRU equations; zeros past each length, as packed."""
    N, outputs, threads = x.shape[1], [], torch.get_num_threads()
    try:
        with ThreadPoolExecutor(2) as pool:
            for b, length in enumerate(lengths):
                sequence = x[b, :length]                                                 # [L, I]
                for layer in range(gru.num_layers):
                    sequence = bidirectional_gru_layer(gru, layer, sequence, pool)       # [L, 2H]
                outputs.append(sequence if length == N else F.pad(sequence, (0, 0, 0, N - length)))   # [N, 2H]
    finally:
        torch.set_num_threads(threads)   # the workers' setting reaches MKL's, which is process-wide
    return outputs[0][None] if len(outputs) == 1 else torch.stack(outputs)              # [B, N, 2H]


def bidirectional_gru_layer(gru: torch.nn.GRU, layer: int, sequence: Tensor, pool: ThreadPoolExecutor) -> Tensor:
    """One layer of bidirectional_gru: sequence [L, I] -> [L, 2H], both directions written into one tensor."""
    L, H = sequence.shape[0], gru.hidden_size
    states = sequence.new_zeros(L + 2, 2 * H)   # rows 1…L: the output; row 0 (forward), row L + 1 (backward): h_0 = 0
    gates, weights = [], []
    for suffix in ("", "_reverse"):
        w_ih, b_ih, w_hh, b_hh = (getattr(gru, f"{name}_l{layer}{suffix}")
                                  for name in ("weight_ih", "bias_ih", "weight_hh", "bias_hh"))
        gates.append(linear(sequence, w_ih, b_ih))                                       # [L, 3H]
        weights.append((w_hh, b_hh))
    halves = (states[:, :H], states[:, H:])                                              # [L + 2, H] each
    list(pool.map(gru_recurrence, gates, *zip(*weights), halves, (False, True)))
    return states[1:L + 1]                                                               # [L, 2H]


def gru_recurrence(gates: Tensor, weight_hh: Tensor, bias_hh: Tensor, states: Tensor, reverse: bool):
    """One direction of one GRU layer, in a worker thread: from its input gates [L, 3H] (W_i·x_t + b_i, rows r | z |
    n) into states [L + 2, H] (row t + 1 = h_t; rows 0 and L + 1 hold h_0 = 0). torch's equations (nn.GRU):
    r, z = σ(gates_rz + W_hrz·h + b_hrz), n = tanh(gates_n + r ⊙ (W_hn·h + b_hn)), h' = n + z ⊙ (h − n), the
    previous h being row t (forward) or row t + 2 (reverse, from the last step to the first)."""
    torch.set_num_threads(1)
    L, H = gates.shape[0], gates.shape[1] // 3
    rows = states[:, None].unbind(0)                                                     # [1, H] views
    gates_rz, gates_n = gates[:, None, :2 * H].unbind(0), gates[:, None, 2 * H:].unbind(0)
    with torch.inference_mode():                                                         # per thread, like grad mode
        new = gates.new_empty(1, H)
        for t in range(L - 1, -1, -1) if reverse else range(L):
            previous = rows[t + 2] if reverse else rows[t]
            hidden = linear(previous, weight_hh, bias_hh)                                # [1, 3H]
            rz = hidden[:, :2 * H].add_(gates_rz[t]).sigmoid_()                          # [1, 2H]
            torch.addcmul(gates_n[t], rz[:, :H], hidden[:, 2 * H:], out=new).tanh_()     # n
            torch.lerp(new, previous, rz[:, H:], out=rows[t + 1])                        # n + z ⊙ (h − n)
