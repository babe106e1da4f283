"""Analytic FLOPs (per night, forward; C channels, N patches, P patch length, D model width, F FFN width, L layers,
H heads of d = D/H; a multiply-add counts 2), two figures:
    patch embedding   2·C·N·P·D
    per layer ℓ = 1..L
      Q, K, V, out    4 · 2·C·N·D²
      scores q·kᵀ     model: 2·C·N²·D (the function: explicit scores, residual attention adds the previous ones)
                      executed: 2·C·N²·D·ℓ where the "sdpa" path concatenates the queries and keys of layers 1..ℓ
                      (head dims ℓ·d; ℓ = 1 without residual attention and on the "math" path)
      attention · V   2·C·N²·D, executed: 2·C·N²·H·(d + the zero columns model.v_padding adds for FlashAttention)
      FFN             2 · 2·C·N·D·F
    pretrain head     2·C·N·D·P
    training step     3 × forward (backward = 2 × forward; flash-style recomputation in backward is not counted)
(paper config, 8 h: model 1.68 TFLOP forward per night; executed 2.17 with v unpadded, 2.34 with layer 2's v padded
for FlashAttention in bf16.) tests/test_gpu_path.py checks both against torch.utils.flop_counter on a traced step. Also here: the
profiler's names of the ops behind F.scaled_dot_product_attention, i.e. which kernel computed a layer's attention.
"""


def forward_flops(cfg, N: int, executed: bool = False, device: str = "cpu", dtype=None, masked: bool = False) -> dict:
    """Analytic forward FLOPs per night, by component (module docstring): the model's (the function), or as executed
    on `device` in `dtype` (widened scores, v padded where model.v_padding pads it)."""
    import torch
    from model import ATTENTION_KERNELS, v_padding
    C, P, D, F, L, H = cfg.n_channels, cfg.patch_len, cfg.d_model, cfg.d_ff, cfg.n_layers, cfg.n_heads
    d = D // H
    growing = executed and cfg.residual_attention and cfg.attention == "sdpa"
    qk = [d * (layer if growing else 1) for layer in range(1, L + 1)]
    v = [d + (v_padding(ATTENTION_KERNELS[cfg.attention_kernels], device, dtype or torch.float32, width, d, masked)
              if executed and cfg.attention == "sdpa" else 0) for width in qk]
    return {
        "patch embedding": 2 * C * N * P * D,
        "Q,K,V,out": L * 8 * C * N * D * D,
        "scores": sum(2 * C * N * N * H * width for width in qk),
        "attention·V": sum(2 * C * N * N * H * width for width in v),
        "FFN": L * 4 * C * N * D * F,
        "head": 2 * C * N * D * P,
    }


SDPA_OPS = {   # profiler names of the kernels behind F.scaled_dot_product_attention (forward)
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (cpu)",
    "aten::_scaled_dot_product_efficient_attention": "efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_fused_attention_overrideable": "fused (overrideable)",
    "aten::_scaled_dot_product_attention_math": "math",
}
