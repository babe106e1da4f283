"""What the first GPU run needs, checked as far as a CPU can: a traced 8-h training step of the paper config (shapes
and dtypes only, fake tensors), the FLOP figures of bench/pretrain.py against torch.utils.flop_counter, the kernel
rule for v's padding, no attention mask for an unpadded batch, the GRU in fp32 under autocast, the non-finite-step
guard, a resume whose checkpoint was meant for a GPU, the matmul precision and the embedding cache's key."""
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

import model
import runs
import training
import train_pretrain
from model import ATTENTION_KERNELS, ModelConfig, Pretrainer, ProbeConfig, ProbeHead, v_padding

ROOT = Path(__file__).resolve().parents[1]
HOURS_8 = 8 * 3600 * 125                                  # samples of an 8-h window: 4,800 patches of 750
SMALL = ["--config", "configs/pretrain_tiny.yaml", "--model.d_model", "32", "--model.d_ff", "64",
         "--model.max_patches", "300", "--data.window_s", "1800", "--data.stride_s", "1800",
         "--data.num_workers", "0", "--data.val_split", "train", "--train.log_every", "1", "--train.batch_size", "2"]


def bench_flops():
    spec = importlib.util.spec_from_file_location("bench_flops", ROOT / "bench" / "flops.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def traced_step(cfg: ModelConfig, batch: int, padded: bool, monkeypatch, bf16: bool = True):
    """One training step (forward with the loss, backward) of Pretrainer(cfg) on fake tensors [batch, 7, 8 h] under
    CPU bf16 autocast (as the GPU's: linear layers in bf16): no memory, no arithmetic. -> (SDPA calls, FLOPs, loss
    dtype); each call {q, k, v: head dims; dtypes; mask: its shape or None}."""
    calls = []
    real_sdpa = F.scaled_dot_product_attention

    def recorded(q, k, v, attn_mask=None, **kwargs):
        calls.append({"q": q.shape[-1], "k": k.shape[-1], "v": v.shape[-1], "dtypes": {q.dtype, k.dtype, v.dtype},
                      "mask": None if attn_mask is None else tuple(attn_mask.shape)})
        return real_sdpa(q, k, v, attn_mask=attn_mask, **kwargs)
    monkeypatch.setattr(F, "scaled_dot_product_attention", recorded)
    with FakeTensorMode():
        pretrainer = Pretrainer(cfg).train()
        signals = torch.empty(batch, cfg.n_channels, HOURS_8)
        padding_mask = torch.zeros(batch, HOURS_8, dtype=torch.bool) if padded else None   # values unseen: fake
        with FlopCounterMode(display=False) as flops:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = pretrainer(signals, padding_mask)
            loss.backward()
        assert pretrainer.encoder.layers[-1].attn.query.weight.grad.shape == (cfg.d_model, cfg.d_model)
    return calls, flops.get_total_flops(), loss.dtype


def test_traced_8h_step_of_the_paper_config(monkeypatch):
    """Per layer of the paper config (4 heads of 128, residual attention by concatenation): q/k head dims 128, 256,
    384; v at 128 everywhere (no kernel on this path needs it wider); q, k, v in bf16 under autocast, the loss in fp32;
    no mask for a batch without padding, a [S, 1, 1, N] key mask for a padded one (S = 3 nights × 7 channels)."""
    cfg = ModelConfig()
    for padded in (False, True):
        calls, _, loss_dtype = traced_step(cfg, 3, padded, monkeypatch)
        assert [(c["q"], c["k"], c["v"]) for c in calls] == [(128, 128, 128), (256, 256, 128), (384, 384, 128)]
        assert all(c["dtypes"] == {torch.bfloat16} for c in calls) and loss_dtype == torch.float32
        assert [c["mask"] for c in calls] == [(21, 1, 1, 4800) if padded else None] * 3


def test_v_is_padded_only_for_flash_attention_on_cuda():
    """The rule the traced shapes meet on a GPU: layer 2 (q/k 256, v 128) is padded to 256 for FlashAttention only in
    half precision, without a mask, on CUDA, when flash is allowed; layer 3 (384) is beyond flash: never padded."""
    allowed = ATTENTION_KERNELS["no_cudnn"]
    bf16 = torch.bfloat16
    assert [v_padding(allowed, "cuda", bf16, width, 128, masked=False) for width in (128, 256, 384)] == [0, 128, 0]
    assert [v_padding(allowed, "cuda", bf16, width, 128, masked=True) for width in (128, 256, 384)] == [0, 0, 0]
    assert v_padding(allowed, "cuda", torch.float32, 256, 128, masked=False) == 0      # fp32: no flash kernel
    assert v_padding(allowed, "cpu", bf16, 256, 128, masked=False) == 0
    assert v_padding(ATTENTION_KERNELS["efficient"], "cuda", bf16, 256, 128, masked=False) == 0


def test_bench_flop_figures_equal_torch_flop_counter(monkeypatch):
    """bench/flops.py's analytic FLOPs (bench/pretrain.py's and bench/gpu_check.py's figures), 3 × forward per step, are what torch.utils.flop_counter counts for the same
    8-h step: the model's on the math path (explicit scores at head dim d), the executed ones on the sdpa path (scores
    over the concatenated queries and keys; SDPA restricted to its math kernel so that the counter sees its products)."""
    bench = bench_flops()
    math_cfg = ModelConfig(attention="math", dropout=0.0)
    _, counted, _ = traced_step(math_cfg, 1, False, monkeypatch, bf16=False)
    assert counted == 3 * sum(bench.forward_flops(math_cfg, 4800).values())
    sdpa_cfg = ModelConfig(attention_kernels="math", dropout=0.0)
    _, counted, _ = traced_step(sdpa_cfg, 1, False, monkeypatch, bf16=False)
    assert counted == 3 * sum(bench.forward_flops(sdpa_cfg, 4800, executed=True).values())
    assert sum(bench.forward_flops(ModelConfig(), 4800).values()) == pytest.approx(1.676e12, rel=1e-3)
    assert sum(bench.forward_flops(ModelConfig(), 4800, executed=True).values()) == pytest.approx(2.172e12, rel=1e-3)
    padded_v = bench.forward_flops(ModelConfig(), 4800, executed=True, device="cuda", dtype=torch.bfloat16)
    assert sum(padded_v.values()) == pytest.approx(2.337e12, rel=1e-3)                 # layer 2's v at 256


def test_an_unpadded_training_batch_reaches_the_model_without_a_mask(shhs_nights, tmp_path, training_inputs):
    """One-hour nights in half-hour windows: nothing is padded, so the loop hands the model no padding mask."""
    seen = training_inputs(train_pretrain, "Pretrainer")
    train_pretrain.main([*SMALL, "--data.root", str(shhs_nights), "--run", str(tmp_path / "run"),
                         "--train.max_steps", "2"])
    assert seen and all(call[1] is None for call in seen)


def test_the_probe_gru_runs_in_fp32_under_bf16_autocast():
    probe = ProbeHead(ProbeConfig(d_model=8, hidden_size=4, n_layers=2)).train()
    seen = []
    probe.gru.register_forward_hook(lambda module, inputs, output: seen.append((inputs[0], output[0])))
    embeddings = torch.randn(2, 7, 20, 8)
    padding_mask = torch.zeros(2, 20 * 750, dtype=torch.bool)
    padding_mask[1, 15 * 750:] = True
    for mask in (None, padding_mask):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = probe(embeddings.clone(), mask)
        logits.float().sum().backward()
    dtypes = [(i.data.dtype if hasattr(i, "batch_sizes") else i.dtype, o.data.dtype if hasattr(o, "batch_sizes")
               else o.dtype) for i, o in seen]
    assert dtypes == [(torch.float32, torch.float32)] * 2
    assert probe.gru.weight_hh_l0.grad.dtype == torch.float32 and probe.gru.weight_hh_l0.grad.isfinite().all()


class NonFiniteAt:
    """A Pretrainer whose loss is NaN at the given training forward calls (1-based, counted over the run)."""

    def __init__(self, calls: set[int]):
        self.calls, self.count = calls, 0

    def patch(self, monkeypatch):
        outer = self

        class Poisoned(model.Pretrainer):
            def forward(self, *args, **kwargs):
                loss = super().forward(*args, **kwargs)
                if self.training:
                    outer.count += 1
                    if outer.count in outer.calls:
                        return loss * float("nan")
                return loss
        monkeypatch.setattr(train_pretrain, "Pretrainer", Poisoned)


def test_a_nonfinite_step_is_skipped_and_counted(shhs_nights, tmp_path, monkeypatch):
    """grad_accum 2: forward calls 3 and 4 make step 2. Its NaN gradients leave the weights and the optimiser's state
    as step 1 left them (ckpt_prev.pt: step 1, ckpt.pt: step 2); the step is counted in metrics.jsonl and the run goes
    on."""
    run = tmp_path / "run"
    NonFiniteAt({3}).patch(monkeypatch)
    train_pretrain.main([*SMALL, "--data.root", str(shhs_nights), "--train.grad_accum", "2", "--run", str(run),
                         "--train.max_steps", "2", "--train.ckpt_every", "1"])
    step_1, step_2 = (runs.load_checkpoint(run / name, "cpu") for name in (runs.PREVIOUS, runs.LATEST))
    assert (step_1["step"], step_2["step"], step_2["nonfinite_steps"]) == (1, 2, 1)
    parameters = [k for k in step_1["model"] if "running_" not in k and "batches" not in k]   # not BatchNorm's buffers
    assert all(torch.equal(step_1["model"][k], step_2["model"][k]) for k in parameters)
    moments = [(a["exp_avg"], b["exp_avg"]) for a, b in zip(step_1["optimizer"]["state"].values(),
                                                             step_2["optimizer"]["state"].values())]
    assert moments and all(torch.equal(a, b) for a, b in moments)
    assert step_2["scheduler"]["last_epoch"] == 2                                # the schedule went on
    logged = [m for m in runs.read_metrics(run) if "loss" in m]
    assert [m["nonfinite_steps"] for m in logged] == [0, 1]


def test_nonfinite_steps_in_a_row_stop_the_run_with_one_line(shhs_nights, tmp_path, monkeypatch):
    NonFiniteAt(set(range(1, 100))).patch(monkeypatch)
    with pytest.raises(SystemExit, match=r"^step 3: the gradients were not finite for 3 optimiser steps in a row"):
        train_pretrain.main([*SMALL, "--data.root", str(shhs_nights), "--run", str(tmp_path / "run"),
                             "--train.max_steps", "6", "--train.max_nonfinite_steps", "3"])


def test_resume_hands_the_rng_states_to_their_setters_as_cpu_bytes(shhs_nights, tmp_path, monkeypatch):
    """A CUDA resume: the checkpoint is read onto the CPU whatever the device, and both RNG setters (which accept CPU
    byte tensors only) get CPU byte tensors, also from states stored with another dtype."""
    run = tmp_path / "run"
    train_pretrain.main([*SMALL, "--data.root", str(shhs_nights), "--run", str(run), "--train.max_steps", "2",
                         "--train.ckpt_every", "1"])
    ckpt = runs.load_latest(run, torch.device("cuda", 0))     # one process: the device names no collective here
    assert all(t.device.type == "cpu" for t in ckpt["model"].values()) and ckpt["rng_cpu"][0].device.type == "cpu"
    ckpt["rng_cuda"] = [torch.arange(16, dtype=torch.int64)]          # as a foreign writer might store it
    set_cpu, set_cuda = [], []
    monkeypatch.setattr(torch, "set_rng_state", lambda state: set_cpu.append(state))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: set_cuda.append((state, device)))
    training.restore_rng(ckpt, 0, 1, torch.device("cuda", 0))
    (state, device), = set_cuda
    assert set_cpu[0].device.type == "cpu" and set_cpu[0].dtype == torch.uint8
    assert state.device.type == "cpu" and state.dtype == torch.uint8 and state.tolist() == list(range(16))
    assert device == torch.device("cuda", 0)


def test_matmul_precision_is_set_on_cuda_only_and_checked():
    before = torch.get_float32_matmul_precision()
    try:
        assert training.set_matmul_precision(torch.device("cpu"), "medium") == "highest"
        assert torch.get_float32_matmul_precision() == before
        assert training.set_matmul_precision(torch.device("cuda", 0), "medium") == "medium"
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(before)
    with pytest.raises(SystemExit, match="^config: train.matmul_precision must be one of highest, high, medium"):
        training.set_matmul_precision(torch.device("cpu"), "low")


def test_the_embedding_cache_key_covers_precision(shhs_nights):
    import train_probe
    from data import NightDataset
    nights = NightDataset(sorted(shhs_nights.glob("*/*.zarr"))[:2], window_s=1800)
    encoder = model.Encoder(ModelConfig(d_model=16, n_heads=2, n_layers=1, d_ff=32, max_patches=300))
    keys = {train_probe.cache_key(encoder, nights, precision) for precision in ("bf16", "fp32-highest", "fp32-medium")}
    assert len(keys) == 3


def test_a_resume_on_another_number_of_processes_goes_on_from_the_same_window(capsys):
    """A checkpoint written by 2 processes after 3 optimiser steps of 4 windows each (24 windows of the epoch's
    order used), resumed by 1 process: it goes on at its step 6 of the epoch, i.e. window 24 of the same order."""
    tc = train_pretrain.TrainConfig()
    optimizer, scheduler = training.one_cycle([torch.nn.Parameter(torch.zeros(1))], tc, 10, 100)
    ckpt = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": 3, "epoch": 1,
            "step_in_epoch": 3, "rng_cpu": [torch.get_rng_state()] * 2}
    progress = training.resume(ckpt, optimizer, scheduler, 0, 1, 4, torch.device("cpu"))
    assert progress["step_in_epoch"] == 6 and progress["step"] == 3
    assert "resumed on 1 processes a run written by 2: epoch 1 goes on from window 24" in capsys.readouterr().out
    used = {w for rank in (0, 1) for w in training.epoch_order(100, 1, 0, rank, 2, 4)[:3 * 4]}
    alone = training.epoch_order(100, 1, 0, 0, 1, 4)
    assert used == set(alone[:24]) and not used & set(alone[24:])
