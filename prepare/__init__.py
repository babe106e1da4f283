"""prepare/: NSRR downloads (or any EDF) → night stores. Run `python -m prepare --help`.

Modules: edf (EDF/EDF+ reader, EDF+ annotation writer), annotations (every hypnogram format → 30-s stages; the
stage codes and names), signals (channel resolution, units, filters, resampling), night (one night end to end),
store (night stores written and read, the manifest, splits), one module per dataset (shhs, mesa, mros, apples, wsc,
generic = `edf`), __main__ (the command line).
"""
