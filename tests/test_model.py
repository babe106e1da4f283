"""model.py: shapes, the SDPA path against the math path, padding, losses, corruption, parameter counts, the probe."""
import threading

import pytest
import torch

import cpu_kernels
import model
from model import (Encoder, ModelConfig, PretrainHead, ProbeConfig, ProbeHead, corrupt_values, mask_patches,
                   reconstruction_loss, revin_statistics)

B, C, P, N, D = 2, 3, 25, 40, 32
T = N * P
PADDED_FROM = 28 * P          # night 1: patches 28..39 are padding (a tail of 12 patches)


def tiny_config(**overrides) -> ModelConfig:
    fields = dict(n_channels=C, patch_len=P, max_patches=N, d_model=D, n_layers=3, n_heads=4, d_ff=64)
    return ModelConfig(**{**fields, **overrides})


def tiny_probe_config(**overrides) -> ProbeConfig:
    return ProbeConfig(**{**dict(n_channels=C, d_model=D, hidden_size=16), **overrides})


def randomise_norms(module: torch.nn.Module, seed: int = 0):
    """Non-trivial BatchNorm running statistics and affine parameters, so that eval mode is not the identity there."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            if name.endswith("running_mean") or name.endswith("revin_bias"):
                tensor.copy_(0.2 * torch.randn(tensor.shape, generator=g))
            elif name.endswith("running_var"):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=g))
            elif name.endswith("revin_weight"):
                tensor.copy_(1 + 0.3 * torch.randn(tensor.shape, generator=g))


def night_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    signals = torch.randn(B, C, T, generator=g) * 20 + 3
    padding_mask = torch.zeros(B, T, dtype=torch.bool)
    padding_mask[1, PADDED_FROM:] = True
    signals[1, :, PADDED_FROM:] = 0.0
    return signals, padding_mask


def eval_encoder(**overrides) -> Encoder:
    torch.manual_seed(0)
    encoder = Encoder(tiny_config(**overrides))
    randomise_norms(encoder)
    return encoder.eval()


# ---------------------------------------------------------------------------------------------------------------------
# shapes


def test_shapes_through_every_stage():
    encoder, head = eval_encoder(), PretrainHead(tiny_config())
    probe = ProbeHead(tiny_probe_config()).eval()
    signals, padding_mask = night_batch()
    patches, key_padding = encoder.patchify(signals, padding_mask)
    assert patches.shape == (B, C, N, P)
    assert key_padding.shape == (B, N) and key_padding.dtype == torch.bool
    assert key_padding[1, 28:].all() and not key_padding[1, :28].any() and not key_padding[0].any()
    embeddings = encoder.contextualise(encoder.tokens(patches), key_padding)
    assert embeddings.shape == (B, C, N, D)
    assert torch.equal(encoder.embed(signals, padding_mask), embeddings)
    assert head(embeddings).shape == (B, C, N, P)
    assert probe(embeddings, padding_mask).shape == (B, N // 5, 5)
    assert probe(embeddings).shape == (B, N // 5, 5)
    assert encoder.patchify(signals)[1] is None


def test_patchify_normalises_each_night_and_channel():
    encoder = Encoder(tiny_config())   # RevIN affine at its identity init
    signals = torch.randn(B, C, T) * torch.tensor([1.0, 50.0, 1e3])[:, None] + 7
    patches, _ = encoder.patchify(signals)
    flat = patches.reshape(B, C, -1)
    assert torch.allclose(flat.mean(-1), torch.zeros(B, C), atol=1e-5)
    assert torch.allclose(flat.std(-1, correction=0), torch.ones(B, C), atol=1e-4)
    # patch n of channel c holds samples [n·P, (n+1)·P)
    expected = (signals[0, 1, 3 * P:4 * P] - signals[0, 1].mean()) / signals[0, 1].std(correction=0)
    assert torch.allclose(patches[0, 1, 3], expected, atol=1e-4)


def test_shorter_inputs_use_the_first_rows_of_the_positional_table():
    encoder = eval_encoder()
    signals, _ = night_batch()
    assert encoder.embed(signals[..., :10 * P + 7]).shape == (B, C, 10, D)
    # longer than the table: cut to max_patches, as upstream cuts to its window
    assert encoder.embed(torch.cat([signals, signals], -1)).shape == (B, C, N, D)


# ---------------------------------------------------------------------------------------------------------------------
# attention: SDPA path == math path


@pytest.mark.parametrize("residual_attention", [True, False])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("fused", [False, True])        # True: v zero-padded as for FlashAttention on a GPU
def test_sdpa_path_equals_math_path(residual_attention, padded, fused, monkeypatch):
    if fused:
        monkeypatch.setattr(model, "v_padding", lambda kernels, device, dtype, qk_width, v_width, masked: qk_width - v_width)
    math_encoder = eval_encoder(attention="math", residual_attention=residual_attention)
    sdpa_encoder = Encoder(tiny_config(attention="sdpa", residual_attention=residual_attention)).eval()
    sdpa_encoder.load_state_dict(math_encoder.state_dict())
    signals, padding_mask = night_batch()
    padding_mask = padding_mask if padded else None
    widths = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: widths.append((q.shape[-1], v.shape[-1])) or real_sdpa(q, k, v, **kw))
    with torch.no_grad():
        expected = math_encoder.embed(signals, padding_mask)
        assert not widths                                                # the math path never calls SDPA
        actual = sdpa_encoder.embed(signals, padding_mask)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    d = D // 4
    assert widths == ([(d, d), (2 * d, 2 * d), (3 * d, 3 * d)] if fused and residual_attention else
                      [(d, d), (2 * d, d), (3 * d, d)] if residual_attention else [(d, d)] * 3)


@pytest.mark.parametrize("attention", ["math", "sdpa"])
@pytest.mark.parametrize("residual_attention", [True, False])
@pytest.mark.parametrize("query_block", [16, 256])      # 16: blocks of 16, 16 and 8 queries
def test_cpu_kernels_attention_equals_the_math_path(attention, residual_attention, query_block, monkeypatch):
    """With kernels=cpu_kernels (staging on the CPU) attention is cpu_kernels.attention whatever the path: the same
    function as the math path, a night with a padded tail and an all-padded night included, in blocks of queries of
    any size, one channel sequence per pass, its queries widening d → 2d → 3d with residual attention."""
    monkeypatch.setattr(cpu_kernels, "QUERY_BLOCK", query_block)
    encoder = eval_encoder(attention=attention, residual_attention=residual_attention)
    reference = eval_encoder(attention="math", residual_attention=residual_attention)
    signals, padding_mask = night_batch()
    padding_mask[0, :] = True
    calls = []
    real = cpu_kernels.attention
    monkeypatch.setattr(cpu_kernels, "attention", lambda attn, q, *rest: calls.append(q.shape) or real(attn, q, *rest))
    with torch.inference_mode():
        expected = reference.embed(signals, padding_mask).clone()
        assert not calls                                                 # the reference path: never taken
        actual = encoder.embed(signals, padding_mask, kernels=cpu_kernels).clone()
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(actual).all() and actual[0].abs().max() > 0
    d = D // 4
    assert calls == [(1, 4, N, d)] * 3 * B * C                           # one sequence per pass, 3 layers each


def test_cpu_kernels_attention_carries_the_summed_scores(monkeypatch):
    """With residual attention each layer's carry is its pre-softmax scores, the earlier layers' added: the same
    [N, N] scores per head as the math path's carry (Σ_j s·q_j·k_jᵀ), made a block of queries at a time."""
    carries = {}
    for name, overrides, kernels in (("kernels", {}, cpu_kernels), ("math", {"attention": "math"}, None)):
        encoder = eval_encoder(**overrides)
        calls, attn = [], encoder.layers[0].attn
        owner, function = (cpu_kernels, "attention") if kernels else (type(attn), "math_attention")
        real = getattr(owner, function)

        def recording(*args):
            out, carry = real(*args)
            calls.append(carry.clone())                  # cpu_kernels adds the next layer's scores to it in place
            return out, carry
        monkeypatch.setattr(owner, function, recording)
        with torch.inference_mode():
            encoder.embed(night_batch()[0][:1, :, :T], kernels=kernels)
        carries[name] = calls
        monkeypatch.undo()
    assert len(carries["kernels"]) == 3 * C and len(carries["math"]) == 3   # per layer: each channel / all at once
    for call, scores in enumerate(carries["kernels"]):                       # channel by channel, layer by layer
        torch.testing.assert_close(scores[0], carries["math"][call % 3][call // 3], rtol=1e-5, atol=1e-4)   # [4, N, N]


@pytest.mark.parametrize("onednn", [True, False])
def test_cpu_kernels_linear_is_f_linear_through_onednn(onednn, monkeypatch):
    """cpu_kernels.linear takes oneDNN (ONEDNN) on the CPU for float32 only; the same values as F.linear."""
    monkeypatch.setattr(cpu_kernels, "ONEDNN", onednn)
    calls = []
    real = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise",      # oneDNN's kernel for strided operands is slow
                        lambda *args: calls.append((args[0].shape, args[0].is_contiguous() and args[1].is_contiguous()))
                        or real(*args))
    g = torch.Generator().manual_seed(0)
    x, weight, bias = torch.randn(3, 70, 48, generator=g), torch.randn(20, 48, generator=g), torch.randn(20, generator=g)
    wide_weight = torch.randn(20, 96, generator=g)
    expected = torch.nn.functional.linear(x, weight, bias)
    with torch.inference_mode():
        actual = cpu_kernels.linear(x, weight, bias)
        without_bias = cpu_kernels.linear(x[0], weight)
        in_double = cpu_kernels.linear(x.double(), weight.double(), bias.double())
        strided = cpu_kernels.linear(x.transpose(0, 1), wide_weight[:, ::2], bias)    # non-contiguous operands
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(strided, torch.nn.functional.linear(x.transpose(0, 1), wide_weight[:, ::2], bias),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(without_bias, x[0] @ weight.T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(in_double, expected.double(), atol=1e-5, rtol=1e-5)
    assert calls == ([((3, 70, 48), True), ((70, 48), True), ((70, 3, 48), True)] if onednn else [])


def test_cpu_kernels_run_one_sequence_per_pass(monkeypatch):
    encoder = eval_encoder()
    signals, padding_mask = night_batch()
    passes = []
    real = Encoder.transform
    monkeypatch.setattr(Encoder, "transform", lambda self, x, *rest: passes.append(x.shape[0]) or real(self, x, *rest))
    with torch.inference_mode():
        expected = encoder.embed(signals, padding_mask).clone()
        actual = encoder.embed(signals, padding_mask, kernels=cpu_kernels).clone()
    assert passes == [B * C] + [1] * (B * C)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_residual_attention_changes_the_function():
    with_res = eval_encoder(residual_attention=True)
    without = Encoder(tiny_config(residual_attention=False)).eval()
    without.load_state_dict(with_res.state_dict())
    signals, _ = night_batch()
    with torch.no_grad():
        assert not torch.allclose(with_res.embed(signals), without.embed(signals), atol=1e-3)


@pytest.mark.parametrize("attention", ["math", "sdpa"])
def test_all_padded_night_gives_finite_output_and_gradients(attention):
    encoder = Encoder(tiny_config(attention=attention)).train()
    signals, padding_mask = night_batch()
    padding_mask[0] = True
    patches, key_padding = encoder.patchify(signals, padding_mask)
    embeddings = encoder.contextualise(encoder.tokens(patches), key_padding)
    assert torch.isfinite(embeddings).all()
    embeddings.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in encoder.parameters() if p.grad is not None)


# ---------------------------------------------------------------------------------------------------------------------
# padding


@pytest.mark.parametrize("attention", ["math", "sdpa"])
@pytest.mark.parametrize("partial_patch", [False, True])
def test_valid_outputs_ignore_padded_content_with_valid_statistics(attention, partial_patch):
    """With "valid" statistics, padded samples never reach the model, even inside a partly padded patch."""
    encoder = eval_encoder(attention=attention, revin_stats="valid")
    head = PretrainHead(tiny_config()).eval()
    signals, padding_mask = night_batch()
    padded_from = PADDED_FROM - P + 10 if partial_patch else PADDED_FROM   # patch 27 then holds 10 valid samples
    padding_mask[1, padded_from:] = True
    changed = signals.clone()
    changed[1, :, padded_from:] = 1e3 * torch.randn(C, T - padded_from)
    with torch.no_grad():
        before, after = encoder.embed(signals, padding_mask), encoder.embed(changed, padding_mask)
    torch.testing.assert_close(after[:, :, :28], before[:, :, :28], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after[0], before[0])
    torch.testing.assert_close(head(after)[1, :, :28], head(before)[1, :, :28], atol=1e-5, rtol=1e-5)


def test_window_statistics_do_see_the_padding():
    """Upstream ("window"): the padded tail enters RevIN's mean and std, so valid outputs move when it changes."""
    encoder = eval_encoder(revin_stats="window")
    signals, padding_mask = night_batch()
    changed = signals.clone()
    changed[1, :, PADDED_FROM:] = 1e3 * torch.randn(C, T - PADDED_FROM)
    with torch.no_grad():
        before, after = encoder.embed(signals, padding_mask), encoder.embed(changed, padding_mask)
    assert not torch.allclose(after[1, :, :28], before[1, :, :28], atol=1e-3)
    torch.testing.assert_close(after[0], before[0])   # the other night is untouched (eval-mode BatchNorm)
    # and "valid" statistics equal "window" statistics when nothing is padded
    valid = Encoder(tiny_config(revin_stats="valid")).eval()
    valid.load_state_dict(encoder.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(valid.embed(signals[:1]), encoder.embed(signals[:1]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("revin_stats", ["window", "valid"])
def test_a_truncated_window_is_the_start_of_the_zero_padded_one(revin_stats):
    """patchify(signals cut at the padding, window=T) gives the zero-padded window's first patches, RevIN's "window"
    statistics counting the zeros never made (stage.stage_night's short windows); its RevIN statistics by hand."""
    encoder = eval_encoder(revin_stats=revin_stats)
    signals, padding_mask = night_batch()
    padded, mask = signals[1:], padding_mask[1:]                                  # zeros from PADDED_FROM on
    with torch.no_grad():
        whole, key_padding = encoder.patchify(padded, mask)
        cut, no_padding = encoder.patchify(padded[:, :, :PADDED_FROM], None, window=T)
    assert no_padding is None and key_padding[0].tolist() == [False] * 28 + [True] * 12
    torch.testing.assert_close(cut, whole[:, :, :28], atol=1e-5, rtol=1e-5)
    mean, std = revin_statistics(padded[:, :, :PADDED_FROM], None, 1e-5, length=T)
    x = padded[0, 0].double()                                                    # channel 0, zeros included
    torch.testing.assert_close(mean[0, 0, 0].double(), x.mean(), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(std[0, 0, 0].double(), x.std(correction=0) + 1e-5, atol=1e-5, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# losses and corruption


def test_reconstruction_loss_by_hand_and_ignoring_padding():
    target = torch.zeros(1, 2, 3, 2)
    reconstruction = torch.zeros(1, 2, 3, 2)
    reconstruction[0, 0, 0] = torch.tensor([1.0, 2.0])   # patch (c0, n0): squared error 5
    reconstruction[0, 1, 1] = torch.tensor([3.0, 0.0])   # patch (c1, n1): 9
    reconstruction[0, 1, 2] = torch.tensor([4.0, 4.0])   # patch (c1, n2): 32, padded below
    assert reconstruction_loss(reconstruction, target).item() == pytest.approx((5 + 9 + 32) / 12)
    key_padding = torch.tensor([[False, False, True]])
    loss = reconstruction_loss(reconstruction, target, key_padding)
    assert loss.item() == pytest.approx((5 + 9) / 8)    # 2 channels × 2 valid patches × 2 values
    changed = reconstruction.clone()
    changed[:, :, 2] = float("nan")                      # anything at padded patches
    assert reconstruction_loss(changed, target, key_padding).item() == pytest.approx(loss.item())
    loss_mask = torch.tensor([[[True, False, True], [False, False, False]]])
    assert reconstruction_loss(reconstruction, target, key_padding, loss_mask).item() == pytest.approx(5 / 2)


def test_corrupt_values_zeroes_and_jitters_five_percent_each():
    x = torch.rand(4, 7, 200, 75) + 1.0                  # values in [1, 2): a zero can only come from zeroing
    g = torch.Generator().manual_seed(0)
    corrupted = corrupt_values(x, generator=g)
    zeroed = (corrupted == 0).float().mean().item()
    jittered = ((corrupted != x) & (corrupted != 0)).float().mean().item()
    assert zeroed == pytest.approx(0.05 * 0.95, abs=0.003)   # zeroed and not jittered
    assert jittered == pytest.approx(0.05, abs=0.003)
    # jitter ε·0.1·max|x|: robust std (median |noise| / 0.6745), as 5 % of the jittered values were also zeroed
    noise = (corrupted - x)[(corrupted != x) & (corrupted != 0)]
    assert noise.abs().median().item() / 0.6745 == pytest.approx(0.1 * x.abs().max().item(), rel=0.1)
    same = corrupt_values(x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(same, corrupted)


def test_mask_patches_masks_ratio_and_never_padding():
    patches = torch.randn(8, 7, 300, 5)
    key_padding = torch.zeros(8, 300, dtype=torch.bool)
    key_padding[:, 200:] = True
    corrupted, mask = mask_patches(patches, 0.3, key_padding, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (8, 7, 300) and mask.dtype == torch.bool
    assert not mask[:, :, 200:].any()
    assert mask[:, :, :200].float().mean().item() == pytest.approx(0.3, abs=0.02)
    assert (corrupted[mask] == 0).all()
    assert torch.equal(corrupted[~mask], patches[~mask])


# ---------------------------------------------------------------------------------------------------------------------
# parameter counts (meta device: no memory, no init cost)


def count_trainable(*modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters() if p.requires_grad)


def test_parameter_counts_at_paper_config():
    with torch.device("meta"):
        assert count_trainable(Encoder(ModelConfig()), PretrainHead(ModelConfig())) == 17_299_600
        two_hours = ModelConfig(max_patches=1200)
        assert count_trainable(Encoder(two_hours), PretrainHead(two_hours)) == 15_456_400
        assert count_trainable(Encoder(ModelConfig())) == 14_606_350   # upstream 14,606,353 minus 3 frozen scales
        assert count_trainable(ProbeHead(ProbeConfig())) == 49_315_859


def test_state_dict_names_follow_the_upstream_map():
    """The key map of import_upstream.py: stacked per-channel weights and renamed modules, nothing else."""
    with torch.device("meta"):
        encoder, head, probe = Encoder(ModelConfig()), PretrainHead(ModelConfig()), ProbeHead(ProbeConfig())
    shapes = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    assert shapes["patch_weight"] == (7, 512, 750) and shapes["patch_bias"] == (7, 512)
    assert shapes["pos_embed"] == (4800, 512) and shapes["revin_weight"] == (7,)
    assert shapes["layers.2.norm_ff.running_var"] == (512,) and shapes["layers.0.attn.query.weight"] == (512, 512)
    assert len(shapes) == 71   # upstream's 100 less 3 frozen scales, 14 head keys, and 7 Linears stacked into 2 tensors
    assert tuple(head.weight.shape) == (7, 750, 512)
    probe_shapes = {k: tuple(v.shape) for k, v in probe.state_dict().items()}
    assert len(probe_shapes) == 24
    assert probe_shapes["gru.weight_ih_l0"] == (3072, 3584) and probe_shapes["gru.weight_hh_l1_reverse"] == (3072, 1024)
    assert probe_shapes["mlp.0.weight"] == (1024, 2048) and probe_shapes["mlp.4.weight"] == (5, 1024)


# ---------------------------------------------------------------------------------------------------------------------
# probe


def test_probe_one_logit_vector_per_epoch_and_average_of_patches():
    torch.manual_seed(0)
    probe = ProbeHead(tiny_probe_config()).eval()
    embeddings = torch.randn(B, C, N, D)
    logits = probe(embeddings)
    assert logits.shape == (B, N // 5, 5)
    # the epoch logit is the mean of its 5 per-patch logits
    flat = embeddings * probe.channel_weight[:, None, None] + probe.channel_bias[:, None, None]
    per_patch = probe.mlp(probe.gru(flat.transpose(1, 2).reshape(B, N, C * D))[0])
    torch.testing.assert_close(logits[:, 3], per_patch[:, 15:20].mean(1))


def test_probe_ignores_padded_tail():
    torch.manual_seed(0)
    probe = ProbeHead(tiny_probe_config()).eval()
    _, padding_mask = night_batch()   # night 1: patches 28.. padded → epochs 0..4 fully valid, epoch 5 mixed
    embeddings = torch.randn(B, C, N, D)
    changed = embeddings.clone()
    changed[1, :, 28:] = 100 * torch.randn(C, N - 28, D)
    with torch.no_grad():
        before, after = probe(embeddings, padding_mask), probe(changed, padding_mask)
        unpacked = probe(changed)
    torch.testing.assert_close(after[:, :5], before[:, :5])
    torch.testing.assert_close(after[0], before[0])
    assert not torch.allclose(unpacked[1, :5], before[1, :5], atol=1e-4)   # without the mask the tail would leak in


@pytest.mark.parametrize("padded", [False, True])
def test_cpu_kernels_gru_runs_each_direction_in_its_own_thread_and_equals_nn_gru(padded, monkeypatch):
    """cpu_kernels.bidirectional_gru: the two directions' recurrences of each layer side by side (gru_recurrence),
    the same function as nn.GRU over packed sequences: a padded tail ignored, the backward direction starting at its
    end."""
    torch.manual_seed(0)
    probe = ProbeHead(tiny_probe_config()).eval()
    embeddings = torch.randn(B, C, N, D)
    _, padding_mask = night_batch()
    padding_mask = padding_mask if padded else None
    threads = []
    real = cpu_kernels.gru_recurrence
    monkeypatch.setattr(cpu_kernels, "gru_recurrence",
                        lambda *args: threads.append(threading.get_ident()) or real(*args))
    torch_threads = torch.get_num_threads()
    with torch.inference_mode():
        expected = probe(embeddings.clone(), padding_mask)
        assert not threads
        actual = probe(embeddings.clone(), padding_mask, cpu_kernels)
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-5)
    assert len(threads) == B * 2 * 2 and threading.get_ident() not in threads   # nights × layers × directions
    assert torch.get_num_threads() == torch_threads                              # restored after


def test_probe_valid_lengths_trailing_padding_only():
    padding_mask = torch.zeros(3, 40, dtype=torch.bool)
    padding_mask[0, 30:] = True          # 2 padded patches at the end (patch length 5)
    padding_mask[1, :10] = True          # leading padding is not honoured
    padding_mask[2] = True               # all padding: all patches kept, as upstream
    assert model.valid_lengths(padding_mask, 8).tolist() == [6, 8, 8]


def test_probe_gradients_reach_every_parameter():
    probe = ProbeHead(tiny_probe_config()).train()
    embeddings = torch.randn(B, C, N, D)
    _, padding_mask = night_batch()
    probe(embeddings, padding_mask).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in probe.parameters())


def test_pretraining_step_runs_in_train_mode():
    encoder, head = Encoder(tiny_config()).train(), PretrainHead(tiny_config())
    signals, padding_mask = night_batch()
    target, key_padding = encoder.patchify(signals, padding_mask)
    reconstruction = head(encoder.contextualise(encoder.tokens(corrupt_values(target)), key_padding))
    loss = reconstruction_loss(reconstruction, target, key_padding)
    loss.backward()
    assert torch.isfinite(loss) and encoder.revin_weight.grad is not None and head.weight.grad is not None
    assert encoder.layers[0].norm_attn.num_batches_tracked.item() == 1


def test_absent_channels_are_left_out_of_the_reconstruction_loss():
    torch.manual_seed(0)
    pretrainer = model.Pretrainer(tiny_config()).eval()                # eval: no corruption, no dropout
    randomise_norms(pretrainer)
    signals, padding_mask = night_batch()
    present = torch.tensor([[True, False, True], [True, True, False]])
    loss = pretrainer(signals, padding_mask, present)
    patches, key_padding = pretrainer.encoder.patchify(signals, padding_mask)
    reconstruction = pretrainer.head(pretrainer.encoder.contextualise(pretrainer.encoder.tokens(patches), key_padding))
    squared = (reconstruction - patches).pow(2).sum(-1)                 # [B, C, N]
    counted = present[:, :, None] & ~key_padding[:, None, :]
    assert loss.item() == pytest.approx((squared[counted].sum() / (counted.sum() * P)).item(), rel=1e-5)
    # channels are independent in eval mode: what an absent channel holds changes nothing
    noisy = signals.clone()
    noisy[0, 1] = torch.randn(T) * 100
    assert pretrainer(noisy, padding_mask, present).item() == pytest.approx(loss.item(), rel=1e-5)
    assert pretrainer(signals, padding_mask, torch.ones(B, C, dtype=torch.bool)).item() == \
        pytest.approx(pretrainer(signals, padding_mask).item(), rel=1e-6)


@pytest.mark.parametrize("attention", ["sdpa", "math"])
def test_any_number_of_sequences_per_pass_gives_the_same_embeddings(attention, monkeypatch):
    encoder = eval_encoder(attention=attention)
    signals, padding_mask = night_batch()
    with torch.inference_mode():
        whole = encoder.embed(signals, padding_mask).clone()
        for per_pass in (1, 2, 4):
            monkeypatch.setattr(cpu_kernels, "SEQUENCES_PER_PASS", per_pass)
            torch.testing.assert_close(encoder.embed(signals, padding_mask, kernels=cpu_kernels), whole,
                                       atol=1e-5, rtol=1e-5)


def test_linear_probe_is_one_linear_map_per_patch_averaged_over_the_epoch():
    cfg = ProbeConfig(kind="linear", n_channels=3, d_model=4, n_classes=5)
    probe = ProbeHead(cfg).eval()
    assert not hasattr(probe, "gru") and sum(p.numel() for p in probe.parameters()) == 3 * 4 * 5 + 5 + 2 * 3
    embeddings = torch.randn(2, 3, 10, 4)                                      # [B, C, N, D]: 2 epochs of 5 patches
    x = embeddings.transpose(1, 2).reshape(2, 10, 12)                          # channel-major features per patch
    expected = (x @ probe.linear.weight.T + probe.linear.bias).reshape(2, 2, 5, 5).mean(dim=2)
    torch.testing.assert_close(probe(embeddings), expected)
    torch.testing.assert_close(probe(embeddings, torch.zeros(2, 10 * 7, dtype=torch.bool)), expected)
    with pytest.raises(AssertionError):
        ProbeHead(ProbeConfig(kind="svm"))
