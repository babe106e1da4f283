"""SHHS (Sleep Heart Health Study), visits 1 and 2, as NSRR ships it (docs/formats.md §1-2).

EEG is stored bipolar (`EEG` = C4-A1, `EEG(sec)` = C3-A2); EOG is E1 against ground, taken as stored.
"""
from pathlib import Path

from .night import Night

CHANNELS = {
    "ECG": ["ECG", "EKG"],
    "EOG": ["EOG(L)", "EOGL"],
    "EMG": ["EMG"],
    "EEG": ["EEG", ("EEG(sec)", "EEG 2", "EEG2", "EEG sec", "EEG(SEC)")],
    "SPO2": [("SaO2", "SpO2")],
    "THOR": [("THOR RES", "Thor Res", "THOR")],
    "ABDO": [("ABDO RES", "Abdo Res", "ABDO")],
}


def find_nights(src: Path) -> list[Night]:
    root = Path(src) / "polysomnography"
    nights = []
    for edf in sorted((root / "edfs").glob("shhs[12]/shhs[12]-*.edf")):
        visit_dir, stem = edf.parent.name, edf.stem            # shhs1, shhs1-200001
        nights.append(Night(
            dataset="shhs", night_id=stem, subject=stem.split("-")[1], visit=visit_dir[-1], edf=edf,
            annotations=[root / "annotations-events-nsrr" / visit_dir / f"{stem}-nsrr.xml",
                         root / "annotations-events-profusion" / visit_dir / f"{stem}-profusion.xml"]))
    return nights
