"""prepare/: NSRR downloads (or any EDF) → night stores. Run `python -m prepare --help`.

Modules: edf (EDF/EDF+ reader), annotations (every hypnogram format → 30-s stages), signals
(channel resolution, units, filters, resampling), night (one night end to end), store (atomic
writes, manifest, splits), one module per dataset (shhs, mesa, mros, apples, wsc, generic = `edf`),
synthetic (a synthetic cohort in each dataset's native layout, for tests and the demo).
"""
