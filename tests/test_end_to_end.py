"""The whole chain on the synthetic cohort, small enough for CI: prepare → pretrain → probe → evaluate held-out nights."""
import json

import pandas as pd

import evaluate
import synthetic
import train_pretrain
import train_probe
from prepare.__main__ import main as prepare_main

WINDOW = ["--data.window_s", "1800", "--data.stride_s", "900", "--data.num_workers", "0", "--data.val_split", "train"]


def test_pretrain_probe_evaluate_reaches_kappa_080(tmp_path):
    """32 one-hour nights (16 subjects × 2 visits); two subjects held out. About 1.5 min on 2 CPU cores."""
    synthetic.write_cohort("shhs", tmp_path / "src", nights=32, hours=1, seed=21)
    nights = tmp_path / "nights"
    prepare_main(["shhs", str(tmp_path / "src"), str(nights), "--workers", "2"])
    manifest = pd.read_csv(nights / "manifest.csv", dtype=str)
    manifest["split"] = ["test" if s in ("200005", "200006") else "train" for s in manifest["subject"]]
    manifest.to_csv(nights / "manifest.csv", index=False)

    train_pretrain.main(["--config", "configs/pretrain_tiny.yaml", "--run", str(tmp_path / "encoder"),
                         "--data.root", str(nights), *WINDOW, "--model.d_model", "32", "--model.d_ff", "64",
                         "--model.max_patches", "300", "--train.max_steps", "60", "--train.batch_size", "4",
                         "--train.eval_every", "60"])
    train_probe.main(["--config", "configs/probe_tiny.yaml", "--encoder", str(tmp_path / "encoder"),
                      "--run", str(tmp_path / "probe"), "--data.root", str(nights), *WINDOW,
                      "--train.max_steps", "150", "--train.max_lr", "0.01", "--train.eval_every", "150"])
    results = evaluate.main(["--run", str(tmp_path / "probe"), "--out", str(tmp_path / "eval"), "--bootstrap", "50"])
    pooled = results["pooled"]
    assert pooled["n_nights"] == 4 and pooled["n_epochs"] > 400
    assert pooled["kappa"] >= 0.80, json.dumps({k: pooled[k] for k in ("kappa", "accuracy", "confusion")})
