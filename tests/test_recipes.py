"""The two recipes end to end on a synthetic cohort of all five datasets: the nights each training stage used
(RUN/cohorts.json) are exactly the recipe's. configs/*_paper.yaml follow the paper's text, configs/*_upstream.yaml
what upstream's code ran (docs/reproduce.md, "Paper text vs upstream code"). Tiny widths, no optimiser step: only the cohorts
are under test here."""
import pytest

import runs
import synthetic
import train_pretrain
import train_probe
from prepare.__main__ import main as prepare_main
from prepare.store import read_manifest

TINY = ["--model.d_model", "16", "--model.n_layers", "1", "--model.n_heads", "2", "--model.d_ff", "32",
        "--model.max_patches", "60", "--data.window_s", "360", "--data.num_workers", "0", "--train.max_steps", "0",
        "--train.batch_size", "1", "--train.grad_accum", "1"]
NIGHTS = {"shhs": 6, "mesa": 8, "mros": 8, "wsc": 4, "apples": 4}


@pytest.fixture(scope="module")
def nights(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    for dataset, n in NIGHTS.items():
        synthetic.write_cohort(dataset, root / "src" / dataset, nights=n, hours=0.25, seed=3)
        prepare_main([dataset, str(root / "src" / dataset), str(root / "nights")])
    return root / "nights"


def expected(nights, datasets, fractions, split="train", **switches):
    manifest = read_manifest(nights, split, datasets, fractions, **switches)
    return sorted(f"{d}/{n}" for d, n in zip(manifest["dataset"], manifest["night_id"]))


@pytest.mark.parametrize("recipe", ["paper", "upstream"])
def test_each_stage_trains_on_exactly_its_recipes_nights(nights, tmp_path, recipe):
    encoder, probe = tmp_path / "encoder", tmp_path / "probe"
    # upstream holds out 100 MESA nights (data.mesa_holdout); of 8 synthetic ones, 3
    holdout = ["--data.mesa_holdout", "3"] if recipe == "upstream" else []
    train_pretrain.main(["--config", f"configs/pretrain_{recipe}.yaml", *TINY, "--data.root", str(nights),
                         "--run-dir", str(encoder), *holdout])
    train_probe.main(["--config", f"configs/probe_{recipe}.yaml", *TINY, "--data.root", str(nights), "--encoder",
                      str(encoder), "--run-dir", str(probe), "--train.cache_embeddings", "false", *holdout])
    pretrained_on, probed_on = runs.read_cohorts(encoder)["train"], runs.read_cohorts(probe)["train"]
    fractions = None if recipe == "paper" else [0.49, 0.21, 0.30]
    if recipe == "paper":        # the paper's text: SHHS, WSC, MrOS visit 1 for both stages; MESA held out
        assert pretrained_on == expected(nights, ["shhs", "wsc", "mros:1"], fractions)
        assert probed_on == pretrained_on
    else:                        # upstream's code: + MESA (its training share) in pretraining; the probe on SHHS only,
        # split again on its own (data.resplit_seed)
        assert pretrained_on == expected(nights, ["shhs", "wsc", "mros:1", "mesa"], fractions, mesa_holdout=3)
        assert any(n.startswith("mesa/") for n in pretrained_on)
        held_out = expected(nights, ["mesa"], fractions, split="test", mesa_holdout=3)
        assert len(held_out) == 3 and not set(pretrained_on) & set(held_out)
        assert probed_on == expected(nights, ["shhs"], fractions, resplit_seed=126) and probed_on
    for used in (pretrained_on, probed_on):   # never in training: APPLES, MrOS visit 2, and MESA in the paper's probe
        assert not [n for n in used if n.startswith("apples/") or n.startswith("mros/mros-visit2")]
    assert not [n for n in probed_on if n.startswith("mesa/")]
