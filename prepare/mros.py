"""MrOS (Osteoporotic Fractures in Men) sleep visits 1 and 2 (docs/formats.md §1-2).

Every electrode is stored against the recorder reference, so each slot is a derivation. Visit 1
and visit 2 spell the electrodes differently (LOC/A2 vs E1/M2, Thoracic vs Chest); either set is
accepted in either visit.
"""
from pathlib import Path

from .night import Night

LEFT_MASTOID, RIGHT_MASTOID = ("A1", "M1"), ("A2", "M2")
CHANNELS = {
    "ECG": [[("ECG L", "ECGL"), ("ECG R", "ECGR")], "ECG (L-R)"],
    "EOG": [[("LOC", "E1"), RIGHT_MASTOID], "E1-M2"],
    "EMG": [[("L Chin", "LChin"), ("R Chin", "RChin")], "EMG (L-R)"],
    "EEG": [["C4", LEFT_MASTOID], ["C3", RIGHT_MASTOID], "C4-M1", "C3-M2"],
    "SPO2": [("SaO2", "SpO2")],
    "THOR": [("Thoracic", "Chest")],
    "ABDO": [("Abdominal", "ABD", "Abdomen")],
}


def find_nights(src: Path) -> list[Night]:
    root = Path(src) / "polysomnography"
    nights = []
    for edf in sorted((root / "edfs").glob("visit[12]/mros-visit[12]-*.edf")):
        visit_dir, stem = edf.parent.name, edf.stem            # visit1, mros-visit1-aa0001
        nights.append(Night(
            dataset="mros", night_id=stem, subject=stem.rsplit("-", 1)[1], visit=visit_dir[-1], edf=edf,
            annotations=[root / "annotations-events-nsrr" / visit_dir / f"{stem}-nsrr.xml",
                         root / "annotations-events-profusion" / visit_dir / f"{stem}-profusion.xml"]))
    return nights
