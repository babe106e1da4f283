"""Three switches that reproduce upstream's training code, each against hand-computed values:
train.trim_validation (the probe's validation scored without the trimmed wake), train.cutmix_on signals (CutMix of the
raw 30-s signal segments of every position before the frozen encoder) and train.evals_per_epoch (validation at evenly
spaced optimiser steps of each epoch, in both training scripts)."""
import shutil

import pytest
import torch
import torch.nn.functional as F

import data
import model
import runs
import training
import train_pretrain
import train_probe
from model import ProbeConfig, ProbeHead

W, N1, N2, N3, R = 0, 1, 2, 3, 4

SMALL_ENCODER = ["--config", "configs/pretrain_tiny.yaml", "--model.d_model", "32", "--model.d_ff", "64",
                 "--model.max_patches", "300", "--data.window_s", "1800", "--data.stride_s", "1800",
                 "--data.num_workers", "0", "--data.val_split", "train", "--train.batch_size", "4"]
SMALL_PROBE = ["--config", "configs/probe_tiny.yaml", "--probe.hidden_size", "16", "--probe.n_layers", "1",
               "--probe.dropout", "0", "--data.window_s", "1800", "--data.stride_s", "1800", "--data.num_workers", "0",
               "--data.val_split", "train", "--train.batch_size", "4", "--train.log_every", "1"]
N_WINDOWS = 12                                   # shhs_nights: 6 one-hour nights in half-hour windows


def probe_args(nights, encoder, run, *extra):
    return [*SMALL_PROBE, "--data.root", str(nights), "--encoder", str(encoder), "--run", str(run), *map(str, extra)]


@pytest.fixture(scope="module")
def encoder_run(shhs_nights, tmp_path_factory):
    """A tiny encoder pretrained for 2 steps on the shared nights (read-only: tests copy it to build caches)."""
    run = tmp_path_factory.mktemp("switches") / "encoder"
    train_pretrain.main([*SMALL_ENCODER, "--data.root", str(shhs_nights), "--run", str(run), "--train.max_steps", "2"])
    return run


# ----------------------------------------------------------------------------------------------------------------------
# D. train.trim_validation


def test_trim_validation_scores_the_focal_loss_over_the_trimmed_stages():
    """Two windows of 25 epochs given as embeddings. The first has excess wake: the paper's rule leaves out its first
    10 and last 4 epochs (W 18 > N2 4: 14 go, the evening first; tests/test_train_probe.py). The second has none."""
    torch.manual_seed(0)
    C, D, E, k = 2, 4, 25, 5
    cfg = train_probe.Config()
    cfg.probe = ProbeConfig(n_channels=C, d_model=D, hidden_size=4, n_layers=1, dropout=0.0)
    cfg.train.loss_trim_wake, cfg.train.batch_size, cfg.data.num_workers = "paper", 2, 0
    probe = ProbeHead(cfg.probe)
    stages = torch.tensor([[W] * 10 + [N2, N2, W, N2, N2, R, R] + [W] * 8,
                           [N2] * 10 + [W] * 5 + [R] * 8 + [-1, N3]])
    embeddings = torch.randn(2, C, E * k, D)
    windows = [{"embeddings": embeddings[b], "padded_epochs": torch.zeros(E, dtype=torch.bool), "stages": stages[b],
                "n_valid_epochs": E} for b in range(2)]
    kept = stages >= 0
    kept[0, :10] = kept[0, 21:] = False                                   # the paper's trim, by hand
    with torch.no_grad():
        logits = probe.eval()(embeddings.clone(), None)                   # [2, E, 5]
    p_true = F.softmax(logits, dim=-1).gather(2, stages.clamp_min(0)[..., None])[..., 0]   # [2, E]
    focal = -(1 - p_true) ** 2 * p_true.log()                             # γ = 2, no class weights

    def scores(trim_validation):
        cfg.train.trim_validation = trim_validation
        return train_probe.validate(probe, None, windows, cfg, 0, 1, torch.device("cpu"), train_probe.nullcontext(),
                                    None)
    trimmed, untrimmed = scores(True), scores(False)
    assert trimmed["val_loss"] == pytest.approx(focal[kept].mean().item(), rel=1e-5)
    assert untrimmed["val_loss"] == pytest.approx(focal[stages >= 0].mean().item(), rel=1e-5)
    assert trimmed["val_loss"] != pytest.approx(untrimmed["val_loss"], rel=1e-3)
    correct = logits.argmax(-1) == stages
    assert trimmed["val_accuracy"] == pytest.approx(correct[kept].float().mean().item())


# ----------------------------------------------------------------------------------------------------------------------
# F. train.cutmix_on signals


def test_cutmix_signals_moves_every_segment_with_its_label_padding_included():
    B, C, E, S = 3, 2, 4, 6                          # 6 samples per epoch, for the test
    ids = torch.arange(B * E).view(B, 1, E, 1).float()                    # each (night, epoch) its own id
    signals = (ids * 100 + torch.arange(C).view(1, C, 1, 1) * 10 + torch.arange(S)).reshape(B, C, E * S)
    stages = torch.tensor([[W, N1, N2, -1], [N3, R, W, N2], [R, N2, -1, -1]])
    padded = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)   # night 2 ends early
    torch.manual_seed(0)
    mixed, mixed_stages = train_probe.cutmix_signals(signals, stages, p=1.0, epoch_samples=S)
    segments = mixed.reshape(B, C, E, S)
    source = (segments[:, 0, :, 0] / 100).round().long()                  # [B, E] id of the segment now there
    expected = (source[:, None, :, None] * 100 + torch.arange(C).view(1, C, 1, 1) * 10 + torch.arange(S)).float()
    assert torch.equal(segments, expected)                                # whole segments, every channel together
    assert sorted(source.flatten().tolist()) == list(range(B * E))        # a permutation of ALL positions
    assert torch.equal(mixed_stages, stages.flatten()[source])            # each label moved with its segment
    assert (source.flatten() != torch.arange(B * E)).any()
    assert (source // E != torch.arange(B)[:, None]).any()                # across nights
    assert padded.flatten()[source][~padded].any()                        # a padded segment landed in a valid slot
    assert (~padded.flatten()[source])[padded].any()                      # and a real one in a padded slot
    same, same_stages = train_probe.cutmix_signals(signals, stages, p=0.0, epoch_samples=S)
    assert same is signals and same_stages is stages


def test_cutmix_on_signals_feeds_the_encoder_mixed_signals_of_trimmed_labels(shhs_nights, encoder_run, tmp_path,
                                                                            monkeypatch, capsys):
    """One training step with p = 1, no validation windows: the training windows bypass the embedding cache (one
    printed line, no cache written), the encoder's one call gets the batch's signals with whole 30-s segments
    permuted and the batch's padding mask unchanged, and the loss gets each segment's label after the wake trim. The
    synthetic nights' half-hour windows have no excess wake, so a stand-in trim rule leaves out every window's first 5
    epochs: their -1 labels must travel with their segments."""
    encoder_dir = tmp_path / "encoder"
    shutil.copytree(encoder_run, encoder_dir)
    embedded, scored = [], []
    embed, focal_loss = model.Encoder.embed, train_probe.focal_loss

    def recording_embed(self, signals, padding_mask=None, *rest):
        embedded.append((signals.clone(), None if padding_mask is None else padding_mask.clone()))
        return embed(self, signals, padding_mask, *rest)

    def recording_loss(logits, stages, *rest):
        scored.append(stages.clone())
        return focal_loss(logits, stages, *rest)
    monkeypatch.setattr(model.Encoder, "embed", recording_embed)
    monkeypatch.setattr(train_probe, "focal_loss", recording_loss)
    monkeypatch.setitem(data.WAKE_TRIMS, "first5",
                        lambda stages: torch.cat([torch.full_like(stages[:5], -1), stages[5:]]))
    switches = ["--data.mask_epochs", "unscored", "--train.loss_trim_wake", "first5"]
    train_probe.main(probe_args(shhs_nights, encoder_dir, tmp_path / "run", "--train.max_steps", "1",
                                "--data.val_split", "val", "--train.cutmix_on", "signals", "--train.cutmix_p", "1",
                                *switches))
    assert "the training windows are embedded live" in capsys.readouterr().out
    assert not (encoder_dir / "embeddings").exists()
    assert len(embedded) == 1 and len(scored) == 1
    (signals, padding_mask), stages = embedded[0], scored[0]

    # the first batch by hand: epoch 0's order, its windows' signals, masks and trimmed stages
    cfg = train_probe.config.load(train_probe.Config, "configs/probe_tiny.yaml", [
        "--data.root", str(shhs_nights), "--data.window_s", "1800", "--data.stride_s", "1800", *switches])
    nights = train_probe.labelled_nights(cfg, "train")
    first = training.epoch_order(len(nights), 0, 0, 0, 1, 4)[:4]
    items = [nights[i] for i in first]
    original = torch.stack([item["signals"] for item in items]).float()                 # [4, 7, L]
    trimmed = torch.stack([data.WAKE_TRIMS["first5"](item["stages"]) for item in items])     # [4, E]
    mask = torch.stack([item["padding_mask"] for item in items])
    assert torch.equal(mask, torch.zeros_like(mask) if padding_mask is None else padding_mask)   # not moved
    assert mask.any()                                                     # unscored epochs are padding here
    B, C, L = original.shape
    E = trimmed.shape[1]
    segments_in = original.reshape(B, C, E, 3750).transpose(1, 2).reshape(B * E, -1)   # [B·E, C·3750]
    segments_out = signals.reshape(B, C, E, 3750).transpose(1, 2).reshape(B * E, -1)
    source = torch.tensor([int(torch.nonzero((segments_in == s).all(dim=1))[0, 0]) for s in segments_out])
    assert sorted(source.tolist()) == list(range(B * E))                  # every segment of the batch, once
    assert (source != torch.arange(B * E)).float().mean() > 0.5
    assert torch.equal(stages.flatten(), trimmed.flatten()[source])       # labels after the trim, moved along


def test_cutmix_on_an_unknown_value_is_one_line(shhs_nights, encoder_run, tmp_path, one_line_exit):
    message = one_line_exit(lambda: train_probe.main(probe_args(shhs_nights, encoder_run, tmp_path / "run",
                                                                "--train.cutmix_on", "signal")))
    assert "train.cutmix_on" in message and "'signal'" in message


# ----------------------------------------------------------------------------------------------------------------------
# K. train.evals_per_epoch


def test_validation_points_are_evenly_spaced_optimiser_steps():
    def points(steps_per_epoch, n):
        return [s for s in range(1, steps_per_epoch + 1) if training.validation_point(s, steps_per_epoch, n)]
    assert points(3, 2) == [2, 3]                     # 1.5 rounds up
    assert points(6, 4) == [2, 3, 5, 6]               # 1.5, 3, 4.5, 6
    assert points(65, 2) == [33, 65]                  # upstream, 65 steps × 8: micro-batches 260 (step 33) and 520
    assert points(10, 1) == [10]
    assert points(2, 5) == [1, 2]                     # more validations than steps: each step at most once


def test_probe_validates_twice_per_epoch(shhs_nights, encoder_run, tmp_path):
    run = tmp_path / "run"
    train_probe.main(probe_args(shhs_nights, encoder_run, run, "--train.epochs", "2", "--train.evals_per_epoch", "2",
                                "--train.patience", "0", "--train.cutmix_p", "0"))
    steps_per_epoch = N_WINDOWS // 4                  # batch 4, no accumulation, 1 process: 3
    assert steps_per_epoch == 3
    assert [m["step"] for m in runs.read_metrics(run) if "val_kappa" in m] == [2, 3, 5, 6]


def test_pretraining_validates_at_evenly_spaced_steps(shhs_nights, tmp_path):
    run = tmp_path / "run"
    train_pretrain.main([*SMALL_ENCODER, "--data.root", str(shhs_nights), "--run", str(run), "--train.epochs", "2",
                         "--train.batch_size", "2", "--train.evals_per_epoch", "4", "--train.eval_every", "5"])
    steps_per_epoch = N_WINDOWS // 2                  # batch 2, no accumulation, 1 process: 6
    assert steps_per_epoch == 6                       # points 1.5 → 2, 3, 4.5 → 5, 6; eval_every ignored
    assert [m["step"] for m in runs.read_metrics(run) if "val_loss" in m] == [2, 3, 5, 6, 8, 9, 11, 12]


def test_killed_run_with_the_upstream_switches_resumes_to_the_same_result(shhs_nights, encoder_run, tmp_path,
                                                                          kill_and_resume):
    """Signal CutMix (p = 1: a draw every step), trimmed validation and two validations per epoch (steps 2, 3, 5, 6):
    killed after step 3 and resumed from step 2, the run ends with the same weights and the same metrics lines."""
    encoder_dir = tmp_path / "encoder"
    shutil.copytree(encoder_run, encoder_dir)
    switches = ["--train.max_steps", "6", "--train.ckpt_every", "2", "--train.cutmix_on", "signals",
                "--train.cutmix_p", "1", "--train.trim_validation", "true", "--train.evals_per_epoch", "2",
                "--train.patience", "0"]
    kill_and_resume("train_probe.py", train_probe.main,
                    lambda run: probe_args(shhs_nights, encoder_dir, run, *switches), tmp_path, 6)
    assert [m["step"] for m in runs.read_metrics(tmp_path / "killed") if "val_loss" in m] == [2, 3, 5, 6]
