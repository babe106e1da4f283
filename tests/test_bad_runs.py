"""Issue 14's rules for batches, runs and configs: each mistake is one line that names the file, field or night, and
nothing wrong or partial is left behind (the good nights of a batch still land)."""
import errno
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest
import torch

import evaluate
import runs
import stage
import synthetic
import train_pretrain
from data import NightDataset
from prepare import store
from prepare.__main__ import main as prepare_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--config", "configs/pretrain_tiny.yaml", "--model.d_model", "16", "--model.d_ff", "32", "--model.n_heads",
         "2", "--model.max_patches", "300", "--data.window_s", "1800", "--data.num_workers", "0",
         "--data.val_split", "train", "--train.log_every", "1", "--train.batch_size", "4", "--train.eval_every", "0"]


def pretrain_args(nights, run, *extra):
    return [*SMALL, "--data.root", str(nights), "--run-dir", str(run), *map(str, extra)]


# ---------------------------------------------------------------------------------------------------------------------
# runs: resume, checkpoints, extension


def test_resume_survives_a_torn_metrics_line_and_extends_a_finished_run(shhs_nights, tmp_path, one_line_exit):
    """A finished 2-step run, its metrics.jsonl torn mid-line by a kill, continued to 4 steps: the LR from step 3 on
    is the 4-step plan's (docs/bad-input.md: "Continuing a run for longer")."""
    extended, planned = tmp_path / "extended", tmp_path / "planned"
    train_pretrain.main(pretrain_args(shhs_nights, extended, "--train.max_steps", 2))
    with open(extended / runs.METRICS, "a") as f:
        f.write('{"step": 3, "lo')                                   # the kill came mid-write
    train_pretrain.main(pretrain_args(shhs_nights, extended, "--train.max_steps", 4, "--resume"))
    train_pretrain.main(pretrain_args(shhs_nights, planned, "--train.max_steps", 4))
    lr = {run: {m["step"]: m["lr"] for m in runs.read_metrics(run) if "lr" in m} for run in (extended, planned)}
    assert sorted(lr[extended]) == [1, 2, 3, 4]
    assert lr[extended][3] == pytest.approx(lr[planned][3]) and lr[extended][4] == pytest.approx(lr[planned][4])
    assert runs.read_run(extended).checkpoint["step"] == 4
    (extended / runs.METRICS).write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    assert "line 2" in one_line_exit(lambda: runs.read_metrics(extended))   # damage inside the file is named


def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(shhs_nights, tmp_path, capsys, one_line_exit):
    run = tmp_path / "run"
    train_pretrain.main(pretrain_args(shhs_nights, run, "--train.max_steps", 3, "--train.ckpt_every", 1))
    assert runs.load_checkpoint(run / runs.PREVIOUS, "cpu")["step"] == 2
    data = (run / runs.LATEST).read_bytes()
    (run / runs.LATEST).write_bytes(data[: len(data) // 2])          # a copy cut short
    train_pretrain.main(pretrain_args(shhs_nights, run, "--train.max_steps", 4, "--resume"))
    assert f"{run / runs.LATEST}: not a readable checkpoint" in capsys.readouterr().out
    assert runs.read_run(run).checkpoint["step"] == 4
    for name in (runs.LATEST, runs.PREVIOUS):
        (run / name).write_bytes(b"garbage")
    message = one_line_exit(lambda: train_pretrain.main(pretrain_args(shhs_nights, run, "--resume")))
    assert str(run / runs.LATEST) in message and "not a readable checkpoint" in message


def test_a_full_disk_during_a_checkpoint_leaves_the_old_one_and_no_temporary(tmp_path, monkeypatch, one_line_exit):
    path = tmp_path / runs.LATEST
    runs.save_checkpoint(path, {"step": 1})

    def full_disk(state, target):
        with open(target, "wb") as f:
            f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk)
    message = one_line_exit(lambda: runs.save_checkpoint(path, {"step": 2}))
    assert str(path) in message and "No space left on device" in message
    assert [p.name for p in tmp_path.iterdir()] == [runs.LATEST]
    assert runs.load_checkpoint(path, "cpu") == {"step": 1}


def test_evaluate_refuses_a_run_without_a_final_checkpoint_unless_latest(tiny_probe_run, tmp_path, one_line_exit):
    killed = tmp_path / "killed"
    shutil.copytree(tiny_probe_run, killed)
    (killed / runs.FINAL).rename(killed / runs.LATEST)
    message = one_line_exit(lambda: evaluate.main(["--run", str(killed), "--out", str(tmp_path / "eval")]))
    assert str(killed) in message and "--latest" in message and "no final checkpoint" in message
    assert not (tmp_path / "eval").exists()
    assert stage.load_model(killed, latest=True).config["probe"]["hidden_size"] == 8


def test_a_killed_keep_best_run_is_refused_unless_latest(tiny_probe_run, tmp_path, one_line_exit):
    """A run trained with train.keep_best (or patience) that was killed keeps a best-so-far ckpt_best.pt but no
    ckpt_final.pt: it is not finished, so it is refused as any unfinished run; --latest takes its best so far."""
    import predict
    import yaml
    killed = tmp_path / "killed"
    shutil.copytree(tiny_probe_run, killed)
    config = yaml.safe_load((killed / runs.CONFIG).read_text())
    (killed / runs.CONFIG).write_text(yaml.safe_dump({**config, "train": {"keep_best": True}}))
    runs.save_checkpoint(killed / runs.BEST, {**runs.load_checkpoint(killed / runs.FINAL, "cpu"), "step": 7})
    (killed / runs.FINAL).rename(killed / runs.LATEST)
    with pytest.raises(FileNotFoundError, match="no final checkpoint"):
        runs.read_run(killed)
    edf = tmp_path / "n.edf"
    message = one_line_exit(lambda: predict.main([str(edf), "--run", str(killed), "--out", str(tmp_path / "out")]))
    assert str(killed) in message and "--latest" in message
    assert runs.read_run(killed, latest=True).checkpoint["step"] == 7                  # its best so far


# ---------------------------------------------------------------------------------------------------------------------
# configs and command lines: one line, nothing written


@pytest.mark.parametrize("extra, expected", [
    (["--model.n_heads", "3"], "model.n_heads 3 must divide model.d_model 16"),
    (["--train.batch_size", "-4"], "train.batch_size must be above 0, got -4"),
    (["--data.window_s", "0"], "data.window_s must be above 0"),
    (["--model.dropout", "1.5"], "model.dropout must be between 0 and 1"),
    (["--data.window_s", "3600"], "data.window_s 3600 s is 600 patches of 750 samples; the encoder has positions "
                                  "for 300"),
    (["--train.max_lr", "[1"], "--train.max_lr: cannot read the value '[1'"),
    (["--data.mask_epochs", "masked"], "data.mask_epochs must be one of none, unscored, paper, upstream"),
    (["--data.mask_epochs", "off"], "YAML reads yes/no/on/off as booleans"),
])
def test_config_mistakes_are_one_line_and_write_nothing(shhs_nights, tmp_path, extra, expected, one_line_exit):
    run = tmp_path / "run"
    message = one_line_exit(lambda: train_pretrain.main([*pretrain_args(shhs_nights, run), *extra]))
    assert expected in message
    assert not run.exists()


def test_config_files_and_roots_that_are_wrong_are_one_line(shhs_nights, tmp_path, one_line_exit):
    run = tmp_path / "run"
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  d_model: [16\n")
    base = ["--run-dir", str(run), "--data.root", str(shhs_nights)]
    assert "not valid YAML at line 3" in one_line_exit(lambda: train_pretrain.main(["--config", str(broken), *base]))
    assert "--config is required" in one_line_exit(lambda: train_pretrain.main(base))
    missing = one_line_exit(lambda: train_pretrain.main(pretrain_args(tmp_path / "nowhere", run)))
    assert "nowhere: no manifest.csv" in missing
    assert not run.exists()


# ---------------------------------------------------------------------------------------------------------------------
# prepare: the output folder, damaged stores, a full disk, killed workers


@pytest.fixture(scope="module")
def two_nights(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    synthetic.write_cohort("shhs", src, nights=2, hours=0.25, seed=11)
    return src


def test_prepare_checks_that_out_is_writable_before_any_night(two_nights, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert prepare_main(["shhs", str(two_nights), str(blocker / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{blocker / 'out'}: cannot write the output folder" in err and "prepare shhs" not in err


def test_a_damaged_store_is_reported_and_skipped_and_new_nights_land(two_nights, tmp_path, capsys):
    out = tmp_path / "out"
    prepare_main(["shhs", str(two_nights), str(out), "--limit", "1"])
    [damaged] = list(out.glob("shhs/*.zarr"))
    meta = (damaged / "zarr.json").read_text()
    (damaged / "zarr.json").write_text(meta[: len(meta) // 2])        # truncated metadata
    capsys.readouterr()
    prepare_main(["shhs", str(two_nights), str(out)])
    printed = capsys.readouterr().out
    assert f"damaged store left out of the manifest: {damaged}" in printed
    manifest = store.read_manifest(out)
    assert len(manifest) == 1 and manifest["path"][0] != f"shhs/{damaged.name}"


def test_a_truncated_signal_chunk_names_the_store_in_data_and_training(two_nights, tmp_path, one_line_exit):
    out = tmp_path / "out"
    prepare_main(["shhs", str(two_nights), str(out)])
    manifest = store.read_manifest(out)
    manifest["split"] = "train"
    manifest.to_csv(out / "manifest.csv", index=False)
    victim = out / manifest["path"][1]
    chunk = victim / "signals" / "c" / "3" / "0"
    chunk.write_bytes(chunk.read_bytes()[:1000])
    with pytest.raises(store.DamagedStore, match=f"{victim}: damaged night store: signals/c/3/0 holds 1000 bytes"):
        NightDataset([victim], window_s=900)
    run = tmp_path / "run"
    message = one_line_exit(lambda: train_pretrain.main([*pretrain_args(out, run), "--data.window_s", "900"]))
    assert str(victim) in message and "damaged night store" in message


def test_a_full_disk_during_prepare_leaves_no_temporary_store(two_nights, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    written = []

    def full_after_three_chunks(path, values):
        if len(written) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(values.tobytes())
    monkeypatch.setattr(store, "write_chunk", full_after_three_chunks)
    prepare_main(["shhs", str(two_nights), str(out), "--limit", "1"])
    assert "No space left on device" in capsys.readouterr().out
    assert not (out / "shhs").exists() or list((out / "shhs").iterdir()) == []      # no hidden temporary either
    assert store.read_manifest(out).empty


def processes_with(marker: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(pid))
        except OSError:                                               # gone meanwhile, or not ours
            pass
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_killing_prepare_leaves_no_worker_behind(tmp_path):
    src = tmp_path / "src"
    synthetic.write_cohort("shhs", src, nights=6, hours=0.25, seed=12)
    marker = uuid.uuid4().hex                                         # inherited by the workers' environment
    env = {**os.environ, "PYTHONPATH": ROOT, "PFTSLEEP_KILL_AFTER_NIGHT": "1", "PFTSLEEP_TEST_MARKER": marker}
    with open(tmp_path / "stderr", "w") as stderr:   # not a pipe: an orphaned worker would hold it open
        job = subprocess.run([sys.executable, "-m", "prepare", "shhs", str(src), str(tmp_path / "out"), "--workers",
                              "2"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr, timeout=300)
    assert job.returncode == -signal.SIGKILL, (tmp_path / "stderr").read_text()[-2000:]
    deadline = time.monotonic() + 20                                  # the kernel's SIGKILL needs a moment to land
    while processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_with(marker) == []


# ---------------------------------------------------------------------------------------------------------------------
# run folders that are not this version's: their own cause in one line, never "not a probe run"


@pytest.mark.parametrize("text, expected", [
    (b"model: [16\n", "config.yaml: not YAML at line 2, column 1 (expected ',' or ']', but got '<stream end>')"),
    (b"model:\n\t- 16\n", "config.yaml: not YAML at line 2, column 1 (found character '\\t' that cannot start any "
                          "token)"),
    (b"model: caf\xe9\n", "config.yaml: not YAML (not UTF-8 text: byte 0xe9 at offset 10)"),
    (b"just words\n", "config.yaml: not a config (a YAML mapping of sections: model:, probe:, data:, \u2026)"),
    (b"model: {d_model: 16}\ndata: [1]\n", "config.yaml: section data: must be a mapping of fields, got [1]"),
])
def test_a_config_that_is_not_yaml_is_one_line_naming_the_file(tiny_probe_run, tmp_path, text, expected,
                                                              one_line_exit):
    import predict
    run = tmp_path / "run"
    shutil.copytree(tiny_probe_run, run)
    (run / runs.CONFIG).write_bytes(text)
    out = tmp_path / "out"
    message = one_line_exit(lambda: predict.main([str(tmp_path / "n.edf"), "--run", str(run), "--out", str(out)]))
    assert message == f"predict.py: {run / expected}" and "not a probe run" not in message
    message = one_line_exit(lambda: evaluate.main(["--run", str(run), "--out", str(tmp_path / "eval")]))
    assert message == f"evaluate.py: {run / expected}"
    assert not (tmp_path / "eval").exists() and not (out / "summary.csv").exists()


def test_a_run_written_by_a_newer_version_says_so(tiny_probe_run, tmp_path, one_line_exit):
    """No version number is recorded in a run folder: sections, fields or weights this version does not know are how
    a newer version's run shows, and a version key if a newer version writes one."""
    import predict
    import yaml
    run = tmp_path / "run"
    shutil.copytree(tiny_probe_run, run)
    config = yaml.safe_load((run / runs.CONFIG).read_text())

    def staged() -> str:
        return one_line_exit(lambda: predict.main([str(tmp_path / "n.edf"), "--run", str(run), "--out",
                                                   str(tmp_path / "out")]))
    (run / runs.CONFIG).write_text(yaml.safe_dump({**config, "model": {**config["model"], "rope": True},
                                                   "calibration": {"temperature": 1.2}}))
    assert staged() == (f"predict.py: {run / runs.CONFIG} has fields this version does not know: calibration, "
                        f"model.rope: written by a newer version of pftsleep? Read it with that version")
    (run / runs.CONFIG).write_text(yaml.safe_dump({**config, "format_version": 2}))
    assert staged() == (f"predict.py: {run / runs.CONFIG} has fields this version does not know: format_version (it "
                        f"says format_version 2; this version writes none): written by a newer version of pftsleep? "
                        f"Read it with that version")
    (run / runs.CONFIG).write_text(yaml.safe_dump({**config, "data": {"window_s": "eight hours"}}))
    assert staged() == f"predict.py: {run / runs.CONFIG}: data.window_s must be float, got 'eight hours'"
    (run / runs.CONFIG).write_text(yaml.safe_dump(config))
    checkpoint = runs.load_checkpoint(run / runs.FINAL, "cpu")
    runs.save_checkpoint(run / runs.FINAL, {**checkpoint, "model": {**checkpoint["model"],
                                                                    "encoder.rope.inv_freq": torch.zeros(4)}})
    assert staged() == (f"predict.py: {run}: its checkpoint holds weights this version does not know: "
                        f"encoder.rope.inv_freq: written by a newer version of pftsleep? Read it with that version")
    runs.save_checkpoint(run / runs.FINAL, {**checkpoint, "format_version": 3})
    assert staged() == (f"predict.py: {run / runs.FINAL}: it says format_version 3; this version writes none: "
                        f"written by a newer version of pftsleep? Read it with that version")
    assert not (tmp_path / "out" / "summary.csv").exists()
