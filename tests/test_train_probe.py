"""train_probe.py: wake trimming, CutMix, focal loss, the embedding cache, a short run end to end, kill + resume
equals no kill, and channel dropout replacing whole channels' embeddings by absent ones."""
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import runs
import train_pretrain
import train_probe

W, N1, N2, N3, R = 0, 1, 2, 3, 4


def test_unscore_excess_wake_follows_the_papers_rule():
    # 10 W before onset, 4 N2, 2 REM, 8 W after: W (18) > N2 (4), so 14 wake epochs go, the evening ones first.
    stages = torch.tensor([W] * 10 + [N2, N2, W, N2, N2, R, R] + [W] * 8)
    trimmed = data.unscore_excess_wake(stages)
    assert trimmed[:10].tolist() == [-1] * 10
    assert trimmed[10:17].tolist() == stages[10:17].tolist()          # wake inside sleep is never touched
    assert trimmed[17:].tolist() == [W] * 4 + [-1] * 4                 # 4 of the morning wake go, the latest ones
    assert (trimmed == W).sum() == 4 + 1 == (stages == N2).sum() + 1
    balanced = torch.tensor([W, W, N2, N2, N2, W])
    assert torch.equal(data.unscore_excess_wake(balanced), balanced)      # wake not the largest class: unchanged


def test_cutmix_moves_epochs_with_their_labels_and_keeps_padding():
    torch.manual_seed(0)
    B, C, E, k, D = 3, 2, 4, 5, 3
    # every patch embedding carries its (night, epoch) identity, so we can follow where it went
    ids = torch.arange(B * E).view(B, 1, E, 1, 1).float().expand(B, C, E, k, D)
    embeddings = ids.reshape(B, C, E * k, D).clone()
    stages = torch.arange(B * E).view(B, E) % 5
    n_valid = torch.tensor([4, 4, 2])
    mixed, mixed_stages = train_probe.cutmix_epochs(embeddings, stages, n_valid, p=1.0, patches_per_epoch=k)
    moved = mixed.reshape(B, C, E, k, D)[:, 0, :, 0, 0].long()         # [B, E] source (night·E + epoch)
    assert torch.equal(mixed_stages, stages.flatten()[moved])           # labels travel with their epochs
    assert torch.equal(moved[2, 2:], torch.tensor([10, 11]))           # padded epochs stay
    valid_sources = sorted(moved[:, :][torch.arange(E)[None] < n_valid[:, None]].tolist())
    assert valid_sources == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]             # a permutation of the valid epochs
    assert not torch.equal(moved, torch.arange(B * E).view(B, E))
    same, same_stages = train_probe.cutmix_epochs(embeddings, stages, n_valid, p=0.0, patches_per_epoch=k)
    assert same is embeddings and same_stages is stages


def test_focal_loss_matches_its_formula_and_ignores_unscored():
    logits = torch.tensor([[[2.0, 0.5, 0.1, -1.0, 0.0], [0.0, 0.0, 3.0, 0.0, 0.0], [9.0, 9.0, 9.0, 9.0, 9.0]]])
    stages = torch.tensor([[0, 1, -1]])
    p = F.softmax(logits[0, :2], dim=-1)
    p_true = torch.stack([p[0, 0], p[1, 1]])
    expected = (-(1 - p_true) ** 2 * p_true.log()).mean()
    assert train_probe.focal_loss(logits, stages, 2.0, None).item() == pytest.approx(expected.item(), rel=1e-6)
    ce = F.cross_entropy(logits[0, :2], stages[0, :2])
    assert train_probe.focal_loss(logits, stages, 0.0, None).item() == pytest.approx(ce.item(), rel=1e-6)
    weights = torch.tensor([1.0, 3.0, 1.0, 1.0, 1.0])
    weighted = F.cross_entropy(logits[0, :2], stages[0, :2], weight=weights)
    assert train_probe.focal_loss(logits, stages, 0.0, weights).item() == pytest.approx(weighted.item(), rel=1e-6)


SMALL_ENCODER = ["--config", "configs/pretrain_tiny.yaml", "--model.d_model", "32", "--model.d_ff", "64",
                 "--model.max_patches", "300", "--data.window_s", "1800", "--data.stride_s", "1800",
                 "--data.num_workers", "0", "--data.val_split", "train", "--train.batch_size", "4"]
SMALL_PROBE = ["--config", "configs/probe_tiny.yaml", "--probe.hidden_size", "16", "--probe.n_layers", "1", "--probe.dropout", "0",
               "--data.window_s", "1800", "--data.stride_s", "1800", "--data.num_workers", "0",
               "--data.val_split", "train", "--train.batch_size", "4", "--train.log_every", "1"]


def probe_args(nights, encoder, run, *extra):
    return [*SMALL_PROBE, "--data.root", str(nights), "--encoder", str(encoder), "--run", str(run), *map(str, extra)]


@pytest.fixture(scope="module")
def encoder_run(shhs_nights, tmp_path_factory):
    """A tiny encoder pretrained for 2 steps on the shared nights, with its embedding cache of SMALL_PROBE's windows
    already built (by a 1-step probe run), so that every probe run here reuses it, whichever tests run."""
    root = tmp_path_factory.mktemp("probe")
    train_pretrain.main([*SMALL_ENCODER, "--data.root", str(shhs_nights), "--run", str(root / "encoder"),
                         "--train.max_steps", "2"])
    train_probe.main(probe_args(shhs_nights, root / "encoder", root / "warm", "--train.max_steps", "1"))
    return root / "encoder"


def test_probe_run_and_cache_equal_live_encoder(shhs_nights, encoder_run, tmp_path):
    run = tmp_path / "probe"
    train_probe.main(probe_args(shhs_nights, encoder_run, run, "--train.max_steps", "3"))
    lines = runs.read_metrics(run)
    assert [m["step"] for m in lines if "loss" in m] == [1, 2, 3] and "val_kappa" in lines[-1]
    caches = list((encoder_run / "embeddings").glob("*.zarr"))
    assert len(caches) == 1 and (caches[0] / "complete").exists()
    # the cached embeddings are the live encoder's, and the probe on them gives the live logits
    encoder, probe = runs.read_run(run).encoder(), runs.read_run(run).probe()
    nights_set = train_probe.labelled_nights(train_probe.config.load(
        train_probe.Config, "configs/probe_tiny.yaml", ["--data.root", str(shhs_nights), "--data.window_s", "1800",
                                                        "--data.stride_s", "1800"]), "train")
    import zarr
    cache = zarr.open_array(caches[0], mode="r")
    for index in (0, len(nights_set) - 1):
        item = nights_set[index]
        with torch.no_grad():
            live = encoder.embed(item["signals"][None].float(), item["padding_mask"][None])
            cached = torch.from_numpy(cache[index].astype(np.float32))[None]
            assert torch.allclose(cached, live, atol=2e-2 * live.abs().max().item())   # float16 storage
            live_logits = probe(live, item["padding_mask"][None])
            cached_logits = probe(cached, item["padding_mask"][None])
        assert live_logits.shape == (1, 60, 5)                         # one prediction per 30-s epoch
        assert torch.allclose(cached_logits, live_logits, atol=1e-2)
        assert (cached_logits.argmax(-1) == live_logits.argmax(-1)).float().mean() > 0.95
    # a second run reuses the cache instead of recomputing it
    before = caches[0].joinpath("complete").stat().st_mtime
    train_probe.main(probe_args(shhs_nights, encoder_run, tmp_path / "again", "--train.max_steps", "1"))
    assert caches[0].joinpath("complete").stat().st_mtime == before


def test_masked_epochs_get_their_own_cache_of_masked_embeddings(shhs_nights, encoder_run, tmp_path):
    import zarr
    encoder_dir = tmp_path / "encoder"
    shutil.copytree(encoder_run, encoder_dir, ignore=shutil.ignore_patterns("embeddings"))
    for rule in ("none", "upstream"):
        train_probe.main(probe_args(shhs_nights, encoder_dir, tmp_path / rule, "--train.max_steps", "1",
                                    "--data.mask_epochs", rule))
    caches = sorted((encoder_dir / "embeddings").glob("*.zarr"))
    assert len(caches) == 2                                  # the mask is part of the cache key
    cfg = train_probe.config.load(train_probe.Config, "configs/probe_tiny.yaml", [
        "--data.root", str(shhs_nights), "--data.window_s", "1800", "--data.stride_s", "1800",
        "--data.mask_epochs", "upstream"])
    masked_set = train_probe.labelled_nights(cfg, "train")
    def masked_inside(padded):                                                # padding before the window's end
        return padded.any() and (~padded).nonzero().max() > padded.nonzero().min()
    index = next(i for i in range(len(masked_set)) if masked_inside(masked_set[i]["padded_epochs"]))
    item, encoder = masked_set[index], runs.read_run(tmp_path / "upstream").encoder()
    with torch.no_grad():
        live = encoder.embed(item["signals"][None].float(), item["padding_mask"][None])[0]      # [C, N, D]
        unmasked = encoder.embed(item["signals"][None].float())[0]
    key = train_probe.cache_key(encoder, masked_set, "fp32-highest")
    cached = torch.from_numpy(zarr.open_array(encoder_dir / "embeddings" / f"{key}.zarr")[index].astype(np.float32))
    assert torch.allclose(cached, live, atol=2e-2 * live.abs().max().item())
    assert not torch.allclose(unmasked, live, atol=2e-2 * live.abs().max().item())   # the mask reached the encoder


def test_a_run_that_builds_the_cache_trains_as_one_that_reuses_it(shhs_nights, encoder_run, tmp_path):
    encoder = tmp_path / "encoder"
    shutil.copytree(encoder_run, encoder, ignore=shutil.ignore_patterns("embeddings"))
    for run in ("builds", "reuses"):
        train_probe.main(probe_args(shhs_nights, encoder, tmp_path / run, "--train.max_steps", "2"))
    builds, reuses = ([m["loss"] for m in runs.read_metrics(tmp_path / run) if "loss" in m]
                      for run in ("builds", "reuses"))
    assert builds == reuses


def test_killed_probe_run_resumes_to_the_same_parameters(shhs_nights, encoder_run, tmp_path, kill_and_resume):
    steps = ["--train.max_steps", "6", "--train.ckpt_every", "2"]           # CutMix on: its draws must resume too
    kill_and_resume("train_probe.py", train_probe.main, lambda run: probe_args(shhs_nights, encoder_run, run, *steps),
                    tmp_path, 6)


def test_channel_dropout_on_embeddings_is_zeroing_the_channel(encoder_run):
    encoder = runs.read_run(encoder_run).encoder()
    L = 1800 * 125
    signals = torch.randn(2, 7, L) * 30
    padding_mask = torch.zeros(2, L, dtype=torch.bool)
    padding_mask[1, 1200 * 125:] = True
    signals[1, :, 1200 * 125:] = 0
    memo = {}
    absent = train_probe.absent_embeddings(encoder, padding_mask, train_probe.nullcontext(), memo)
    assert absent.shape == (2, 7, 300, 32) and len(memo) == 2        # one per distinct padding
    with torch.no_grad():
        embeddings = encoder.embed(signals, padding_mask)
        zeroed = signals.clone()
        zeroed[0, 3] = 0                                                # EEG of night 0, THOR of night 1
        zeroed[1, 5] = 0
        expected = encoder.embed(zeroed, padding_mask)
    torch.manual_seed(0)
    present = torch.ones(2, 7, dtype=torch.bool)
    dropped = train_probe.drop_channel_embeddings(embeddings, present, padding_mask, encoder, 0.5,
                                                  train_probe.nullcontext(), memo)
    torch.manual_seed(0)                                                # the same draw, to know which rows went
    kept_rows = train_probe.drop_channels(present, 0.5)
    assert 0 < (~kept_rows).sum() < 14
    for b in range(2):
        for c in range(7):
            source = embeddings[b, c] if kept_rows[b, c] else absent[b, c]
            assert torch.equal(dropped[b, c], source)
    # an absent embedding is what the encoder gives that window with the channel zeroed (float16 rounding aside)
    for b, c in ((0, 3), (1, 5)):
        assert torch.allclose(absent[b, c], expected[b, c], atol=1e-2 * expected[b, c].abs().max().item())
    others = [c for c in range(7) if c != 3]
    assert torch.allclose(expected[0, others], embeddings[0, others], atol=1e-5)   # the other channels do not move


def test_channel_dropout_replaces_whole_channels_of_the_probe_input(shhs_nights, encoder_run, tmp_path,
                                                                     training_inputs):
    """The same seed and first batch with and without train.channel_dropout, CutMix off (so nothing else draws): with
    it, some channels' embeddings given to the probe (never all of a window's) are exactly the absent-channel
    embedding, and its first loss differs. A dropout that does nothing fails here."""
    seen = {}
    for p in (0.0, 0.5):
        seen[p] = training_inputs(train_probe, "ProbeHead")
        train_probe.main(probe_args(shhs_nights, encoder_run, tmp_path / f"p{p}", "--train.max_steps", "1",
                                    "--train.cutmix_p", "0", "--train.channel_dropout", p))
    (plain, padding_mask), (embeddings, _) = seen[0.0][0], seen[0.5][0]
    dropped = (embeddings != plain).flatten(2).any(dim=-1)             # [B, C]
    assert dropped.any() and not dropped.all(dim=1).any()
    if padding_mask is None:                                # nothing padded: the loop hands the probe no mask
        padding_mask = torch.zeros(plain.shape[0], plain.shape[2] * 750, dtype=torch.bool)
    absent = train_probe.absent_embeddings(runs.read_run(encoder_run).encoder(), padding_mask, train_probe.nullcontext(), {})
    assert torch.equal(embeddings[dropped], absent[dropped])
    assert runs.read_run(tmp_path / "p0.5").config["train"]["channel_dropout"] == 0.5
    assert runs.read_metrics(tmp_path / "p0.5")[0]["loss"] != runs.read_metrics(tmp_path / "p0.0")[0]["loss"]


# ----------------------------------------------------------------------------------------------------------------------
# The two recipes' switches: wake trimming rules, focal-loss forms


@pytest.mark.parametrize("rule", ["paper", "upstream"])
def test_wake_trimming_rules_on_the_edge_cases(rule):
    trim = data.WAKE_TRIMS[rule]
    # wake is not the largest class: both rules leave the window alone
    balanced = torch.tensor([W, W, N2, N2, N2, W])
    assert torch.equal(trim(balanced), balanced)
    # all wake (or wake and unscored only): nothing to compare with, left alone (upstream's code raises there)
    for stages in (torch.tensor([W] * 6), torch.tensor([-1, W, W, -1])):
        assert torch.equal(trim(stages), stages)
    # evening wake, wake in the middle, morning wake: W 12 > N2 4; pre/post wake 6 + 4 exceeds 4 by 6: the evening goes
    night = torch.tensor([W] * 6 + [N2, N2, W, W, N2, N2] + [W] * 4)
    assert trim(night).tolist() == [-1] * 6 + [N2, N2, W, W, N2, N2] + [W] * 4   # wake in the middle never touched
    # starting asleep: no evening wake; W 7 > N2 3, the 6 morning epochs exceed 3 by 3: the latest 3 go
    asleep_first = torch.tensor([N2, N2, W, N2] + [W] * 6)
    assert trim(asleep_first).tolist() == [N2, N2, W, N2] + [W] * 3 + [-1] * 3
    # ending asleep: W 8 > R 2. The paper's reading has no morning wake: 7 evening - 2 = 5 go. Upstream's "morning" is
    # the last run whatever its stage (R R): 7 + 2 - 2 = 7 go, all from the evening
    ends_asleep = torch.tensor([W] * 7 + [N2, N2, N3, W, R, R])
    tail = [N2, N2, N3, W, R, R]
    assert trim(ends_asleep).tolist() == ([-1] * 5 + [W, W] + tail if rule == "paper" else [-1] * 7 + tail)
    # a short evening, a night ending asleep: W 6 > R 3. Paper: 2 evening epochs do not exceed 3, nothing goes.
    # Upstream: its "morning" is everything after the last wake/non-wake change (N1 N1 R R R, 5 epochs):
    # 2 + 5 - 3 = 4 go, the 2 evening epochs and the last 2 R epochs
    short_evening = torch.tensor([W, W, N2, W, W, W, W, N1, N1, R, R, R])
    expected = (short_evening.tolist() if rule == "paper"
                else [-1, -1, N2, W, W, W, W, N1, N1, R, -1, -1])
    assert trim(short_evening).tolist() == expected


def test_upstream_focal_loss_sums_the_factor_over_classes():
    logits = torch.tensor([[[2.0, 0.5, 0.1, -1.0, 0.0], [0.0, 0.0, 3.0, 0.0, 0.0], [9.0, 9.0, 9.0, 9.0, 9.0]]])
    stages = torch.tensor([[0, 1, -1]])
    p = F.softmax(logits[0, :2], dim=-1)                                       # [2, 5]
    ce = -torch.log(torch.stack([p[0, 0], p[1, 1]]))                            # [2]
    expected = ((1 - p) ** 2).sum(dim=1) * ce                                   # Σ_c (1 - p_c)^γ · CE, per epoch
    got = train_probe.focal_loss(logits, stages, 2.0, None, "upstream")
    assert got.item() == pytest.approx(expected.mean().item(), rel=1e-6)
    standard = train_probe.focal_loss(logits, stages, 2.0, None, "standard")
    assert got.item() > 2 * standard.item()                                      # a scaled cross-entropy, not focal
    weights = torch.tensor([1.0, 3.0, 1.0, 1.0, 1.0])                           # upstream: weighted CE, mean over epochs
    weighted = train_probe.focal_loss(logits, stages, 2.0, weights, "upstream")
    assert weighted.item() == pytest.approx((expected * torch.tensor([1.0, 3.0])).mean().item(), rel=1e-6)


def test_patience_stops_early_and_the_best_epoch_is_the_runs_model(shhs_nights, encoder_run, tmp_path):
    """eval_every 0: validation at every epoch's end; patience 1 with a learning rate too small to change the
    probe (κ stays equal, so never better): training stops after the second validation, and read_run gives the
    checkpoint of the first one."""
    run = tmp_path / "run"
    train_probe.main(probe_args(shhs_nights, encoder_run, run, "--train.epochs", "10", "--train.eval_every", "0",
                                "--train.patience", "1", "--train.best_metric", "val_kappa", "--train.max_lr", "1e-12",
                                "--train.cutmix_p", "0"))
    validations = [m for m in runs.read_metrics(run) if "val_kappa" in m]
    steps_per_epoch = 12 // 4                               # 12 half-hour windows, batch 4, no accumulation
    assert [m["step"] for m in validations] == [steps_per_epoch, 2 * steps_per_epoch]
    assert runs.read_run(run).checkpoint["step"] == steps_per_epoch
    assert runs.load_checkpoint(run / runs.FINAL, "cpu")["step"] == 2 * steps_per_epoch


def test_the_gru_probe_never_ends_far_below_a_linear_one(shhs_nights, encoder_run, tmp_path):
    """probe_tiny.yaml as it is (validation every epoch, patience, the best epoch kept) on the shared six nights: the
    paper's GRU probe must converge at least about as well as a linear map on the same frozen embeddings (it once
    stopped after 24 steps calling every N3 epoch N2, at κ 0.47 where a linear map reached 1.00)."""
    best = {}
    for kind in ("linear", "gru"):
        run = tmp_path / kind
        train_probe.main(["--config", "configs/probe_tiny.yaml", "--data.root", str(shhs_nights), "--encoder",
                          str(encoder_run), "--run-dir", str(run), "--data.window_s", "1800", "--data.stride_s",
                          "1800", "--data.val_split", "train", "--probe.kind", kind])
        best[kind] = max(m["val_kappa"] for m in runs.read_metrics(run) if "val_kappa" in m)
        assert runs.read_run(run).checkpoint["best"] == pytest.approx(best[kind])    # the kept model is that epoch
    assert best["gru"] >= best["linear"] - 0.05, best


def test_a_resumed_probe_takes_a_new_max_lr_but_keeps_its_probe_and_encoder(shhs_nights, encoder_run, tmp_path,
                                                                             one_line_exit):
    """--resume: a new train.max_lr is what the optimiser steps with (the LR of a run planned that way); another
    probe.hidden_size, or an --encoder with other weights, is refused in one line before anything is computed."""
    run, planned = tmp_path / "run", tmp_path / "planned"
    train_probe.main(probe_args(shhs_nights, encoder_run, run, "--train.max_steps", 2))
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    message = one_line_exit(lambda: train_probe.main(probe_args(shhs_nights, encoder_run, run, "--probe.hidden_size", 8,
                                                                "--resume")))
    assert message == (f"--resume: probe.hidden_size is 16 in {run}, 8 now: a resumed run keeps the model and data it "
                       f"was started with; start a new run (another --run-dir)")
    other = tmp_path / "other_encoder"                        # the same config, one weight changed
    shutil.copytree(encoder_run, other, ignore=shutil.ignore_patterns("embeddings"))
    weights = runs.load_checkpoint(other / runs.FINAL, "cpu")
    key = next(k for k in weights["model"] if k.startswith("encoder.") and weights["model"][k].is_floating_point())
    weights["model"][key] = weights["model"][key] + 1
    runs.save_checkpoint(other / runs.FINAL, weights)
    message = one_line_exit(lambda: train_probe.main(probe_args(shhs_nights, other, run, "--resume")))
    assert message == (f"--resume: --encoder {other} has other weights than the encoder {run} was trained on: a "
                       f"resumed run keeps the model and data it was started with; start a new run (another --run-dir)")
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before and not (other / "embeddings").exists()
    train_probe.main(probe_args(shhs_nights, encoder_run, run, "--train.max_steps", 3, "--train.max_lr", 0.002,
                                "--resume"))
    train_probe.main(probe_args(shhs_nights, encoder_run, planned, "--train.max_steps", 3, "--train.max_lr", 0.002))
    lr = {r: {m["step"]: m["lr"] for m in runs.read_metrics(r) if "lr" in m} for r in (run, planned)}
    assert lr[run][3] == pytest.approx(lr[planned][3], rel=1e-12)
