"""synthetic/: synthetic polysomnography nights written in each dataset's native NSRR layout.

This is NOT a stand-in for real data. It exists so that the tests, the demo (`make demo`) and the
benchmarks can exercise the whole pipeline (EDF + annotation reading, channel derivation, unit
conversion, filtering, night stores, training, evaluation) without access to NSRR.

    python -m synthetic shhs /tmp/synth --nights 4 --hours 1 --seed 0

writes `polysomnography/...` exactly where a real NSRR download keeps it, so `python -m prepare shhs
/tmp/synth OUT` reads it like the real thing; the true stages go to `/tmp/synth/.truth/`.

Modules: physiology (stage sequence, stage-dependent signals), noise (generic signal-synthesis helpers), writers (EDF and annotation files),
cohort (per-dataset layouts, nights, `write_cohort`, truth files), __main__ (the CLI).
"""
from .cohort import DATASETS, LAYOUTS, RenderedNight, plan_night, render_night, write_cohort
from .physiology import Profile, draw_profile, night_signals, stage_sequence

__all__ = ["DATASETS", "LAYOUTS", "Profile", "RenderedNight", "draw_profile", "night_signals", "plan_night",
           "render_night", "stage_sequence", "write_cohort"]
