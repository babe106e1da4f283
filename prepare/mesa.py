"""MESA (Multi-Ethnic Study of Atherosclerosis) sleep exam, one night per subject (docs/formats.md §1-2).

EEG3 is C4-M1 (MESA has no C3-M2); EOG-L is E1 against Fpz, taken as stored.
"""
from pathlib import Path

from .night import Night

CHANNELS = {
    "ECG": ["EKG", "ECG"],
    "EOG": [("EOG-L", "E1")],
    "EMG": ["EMG"],
    "EEG": ["EEG3"],
    "SPO2": ["SpO2"],
    "THOR": ["Thor"],
    "ABDO": ["Abdo"],
}


def find_nights(src: Path) -> list[Night]:
    root = Path(src) / "polysomnography"
    nights = []
    for edf in sorted((root / "edfs").glob("mesa-sleep-*.edf")):
        stem = edf.stem                                        # mesa-sleep-0001
        nights.append(Night(
            dataset="mesa", night_id=stem, subject=stem.rsplit("-", 1)[1], visit="sleep", edf=edf,
            annotations=[root / "annotations-events-nsrr" / f"{stem}-nsrr.xml",
                         root / "annotations-events-profusion" / f"{stem}-profusion.xml"]))
    return nights
