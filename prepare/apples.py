"""APPLES (Apnea Positive Pressure Long-term Efficacy Study), NSRR-harmonised EDFs with Luna
`.annot` staging beside them (docs/formats.md §1-2). Labels are already referenced (C4_M1, LOC = LOC-M2);
the unharmonised spellings are accepted too.
"""
from pathlib import Path

from .night import Night

CHANNELS = {
    "ECG": ["ECG", "EKG"],
    "EOG": [("LOC", "EOG_Left", "E1")],
    "EMG": [("EMG", "EMG_Chin")],
    "EEG": [("C4_M1", "EEG_C4_A1"), ("C3_M2", "EEG_C3_A2")],
    "SPO2": [("SpO2", "SaO2")],
    "THOR": [("thorax", "Thor")],
    "ABDO": [("abdomen", "Abdo")],
}


def find_nights(src: Path) -> list[Night]:
    root = Path(src) / "polysomnography"
    nights = []
    for edf in sorted(root.glob("apples-*.edf")):
        stem = edf.stem                                        # apples-130001
        nights.append(Night(dataset="apples", night_id=stem, subject=stem.split("-", 1)[1], visit="dx", edf=edf,
                            annotations=[edf.with_suffix(".annot")]))
    return nights
