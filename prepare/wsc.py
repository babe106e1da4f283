"""WSC (Wisconsin Sleep Cohort), all visits in one flat folder (docs/formats.md §1-2).

Two acquisition systems: Gamma nights (100 Hz) carry `.stg.txt` epoch tables, Twin nights (200 Hz)
`.allscore.txt` event logs; exactly one exists per night. Subject is the numeric id (the stem's
last field is 'nsrr', not the subject).
"""
from pathlib import Path

from .night import Night

CHANNELS = {
    "ECG": [("ECG", "EKG", "EKG1-EKG2")],
    "EOG": [("E1", "LEOG-M2", "E1-M2", "E1_M2")],
    "EMG": [("cchin_l", "chin", "Chin1-Chin2")],
    "EEG": [("C4_M1", "C4-M1"), ("C3_M2", "C3-M2"), "C3_AVG"],
    "SPO2": ["spo2"],
    "THOR": ["thorax"],
    "ABDO": ["abdomen"],
}


def find_nights(src: Path) -> list[Night]:
    root = Path(src) / "polysomnography"
    nights = []
    for edf in sorted(root.glob("wsc-visit*-*-nsrr.edf")):
        stem = edf.stem                                        # wsc-visit1-10119-nsrr
        _, visit, subject, _ = stem.split("-")
        base = edf.with_suffix("")
        nights.append(Night(dataset="wsc", night_id=stem, subject=subject, visit=visit.removeprefix("visit"), edf=edf,
                            annotations=[Path(f"{base}.stg.txt"), Path(f"{base}.allscore.txt")]))
    return nights
