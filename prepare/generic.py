"""Any EDF (dataset name `edf`): the built-in alias table and sidecar annotation discovery.

The alias table covers the common AASM montage spellings; anything else is named with
`--channels map.yaml`. A night's annotations are `--annotations FILE` (one per EDF, in order) or a
sidecar file next to the EDF (`<stem>.xml`, `<stem>-nsrr.xml`, `<stem>.annot`, `<stem>-Hypnogram.edf`,
`<stem>.hypnogram.edf`, `<stem>.stg.txt`, `<stem>.allscore.txt`, `<stem>.csv`, `<stem>.txt`). A night with
neither is prepared unlabelled (all stages -1): still useful for pretraining.
"""
from pathlib import Path

from .edf import EdfError, read_header
from .night import Night

CHANNELS = {
    "ECG": [("ECG", "EKG", "ECG II", "ECG2", "EKG1-EKG2", "ECG1-ECG2", "ECG (L-R)"), [("ECG L", "ECGL"), ("ECG R", "ECGR")]],
    "EOG": [("E1-M2", "LOC-M2", "LOC-A2", "E1-A2", "EOG(L)", "EOG-L", "EOG L", "LEOG-M2", "EOG E1-M2", "EOG left"),
            [("E1", "LOC"), ("M2", "A2")], ("E1", "LOC")],
    "EMG": [("Chin1-Chin2", "EMG chin", "Chin EMG", "EMG", "Chin", "cchin_l", "EMG (L-R)", "Chin1-Chin3"),
            [("L Chin", "LChin", "Chin1"), ("R Chin", "RChin", "Chin2")]],
    "EEG": [("C4-M1", "C4-A1", "EEG C4-M1", "EEG C4-A1", "C4_M1", "EEG"), [("C4",), ("M1", "A1")],
            ("C3-M2", "C3-A2", "EEG C3-M2", "EEG C3-A2", "C3_M2", "EEG(sec)"), [("C3",), ("M2", "A2")]],
    "SPO2": [("SpO2", "SaO2", "SPO2", "Sat", "Oxygen saturation", "OSAT")],
    "THOR": [("Thorax", "THOR RES", "Thor", "Chest", "Thoracic", "RIP Thora", "Effort THO")],
    "ABDO": [("Abdomen", "ABDO RES", "Abdo", "ABD", "Abdominal", "RIP Abdom", "Effort ABD")],
}
SIDECARS = (".xml", "-nsrr.xml", ".annot", "-Hypnogram.edf", ".hypnogram.edf", ".stg.txt", ".allscore.txt",
            ".csv", ".txt")


def is_annotation_only(path: Path) -> bool:
    """Hypnogram EDFs (only an 'EDF Annotations' signal) in the same folder are not nights."""
    try:
        return all(s.label == "EDF Annotations" for s in read_header(path, allow_truncated=True).signals)
    except EdfError:
        return False   # let the night itself fail with its own message


def find_nights(sources: list[Path], annotations: list[Path] | None = None) -> list[Night]:
    edfs = []
    for source in map(Path, sources):
        if source.is_dir():
            edfs += sorted(p for p in source.glob("*") if p.suffix.lower() == ".edf" and not is_annotation_only(p))
        else:
            edfs.append(source)
    if annotations and len(annotations) != len(edfs):
        raise SystemExit(f"--annotations gives {len(annotations)} files for {len(edfs)} EDFs: give one per EDF, in order")
    nights = []
    for i, edf in enumerate(edfs):
        candidates = [Path(annotations[i])] if annotations else [edf.with_name(edf.stem + s) for s in SIDECARS]
        nights.append(Night(dataset="edf", night_id=edf.stem, subject=edf.stem, visit="1", edf=edf,
                            annotations=candidates, labelled=bool(annotations)))
    return nights
