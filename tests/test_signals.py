"""Signal path: units, median, Butterworth and resampling keep in-band sinusoids and cut out-of-band ones."""
import numpy as np
import pytest
import scipy.ndimage

from prepare import generic, signals
from prepare.night import Night, Options, PrepareError, prepare_night

DURATION_S = 600


def amplitude(x, freq, fs=125, skip_s=60):
    """Least-squares amplitude of a sinusoid of known frequency (any phase), ignoring filter start-up."""
    t = np.arange(len(x)) / fs
    keep = slice(int(skip_s * fs), len(x) - int(10 * fs))
    basis = np.c_[np.sin(2 * np.pi * freq * t[keep]), np.cos(2 * np.pi * freq * t[keep]), np.ones(len(t[keep]))]
    coef = np.linalg.lstsq(basis, x[keep], rcond=None)[0]
    return float(np.hypot(coef[0], coef[1]))


def sine(fs, freq, amp, offset=0.0, seconds=DURATION_S):
    t = np.arange(int(seconds * fs)) / fs
    return offset + amp * np.sin(2 * np.pi * freq * t + 0.7)


def base_channels(fs_eeg, eeg_values, dim="uV", rng_scale=1.0, spo2=None, thor=None, spo2_fs=1, thor_fs=10):
    """A valid night: EEG under test plus plausible EOG/EMG/ECG noise."""
    rng = np.random.default_rng(0)
    noise = lambda fs, sd: rng.normal(0, sd, DURATION_S * fs)
    lim = 800 * rng_scale
    return [
        ("C4-M1", fs_eeg, dim, eeg_values, (-lim, lim)),
        ("E1-M2", 100, "uV", noise(100, 20), (-500, 500)),
        ("Chin1-Chin2", 100, "uV", noise(100, 10), (-500, 500)),
        ("ECG", 100, "uV", noise(100, 200), (-3000, 3000)),
        ("SpO2", spo2_fs, "%", spo2 if spo2 is not None else 96 + noise(spo2_fs, 0.5), (0, 100)),
        ("Thorax", thor_fs, "", thor if thor is not None else noise(thor_fs, 1), (-10, 10)),
    ]


def run(tmp_path, edf_writer, channels, opts=None):
    path = edf_writer(tmp_path / "night.edf", channels)
    night = Night(dataset="edf", night_id="night", subject="s", visit="1", edf=path, labelled=False)
    return prepare_night(night, generic.CHANNELS, opts or Options())


@pytest.mark.parametrize("fs", [100, 125, 128, 200, 256, 512])
@pytest.mark.parametrize("dim,scale", [("nV", 1e3), ("uV", 1.0), ("mV", 1e-3), ("V", 1e-6)])
def test_electrode_5hz_keeps_amplitude(tmp_path, edf_writer, fs, dim, scale):
    channels = base_channels(fs, sine(fs, 5, 50 * scale), dim=dim, rng_scale=scale)
    night_signals, stages, attrs = run(tmp_path, edf_writer, channels)
    eeg = night_signals[signals.SLOTS.index("EEG")].astype(np.float64)
    assert night_signals.shape == (7, DURATION_S * 125) and night_signals.dtype == np.float16
    assert amplitude(eeg, 5) == pytest.approx(50, rel=0.02)          # µV whatever the file's unit
    assert attrs["source_units"]["EEG"] == "uV" and attrs["source_fs"]["EEG"] == fs


@pytest.mark.parametrize("fs", [1, 4, 10, 25, 128])
def test_spo2_and_belt_005hz_keep_amplitude(tmp_path, edf_writer, fs):
    spo2 = sine(fs, 0.05, 3, offset=95)
    thor = sine(fs, 0.05, 2)
    channels = base_channels(100, sine(100, 5, 50), spo2=spo2, thor=thor, spo2_fs=fs, thor_fs=fs)
    night_signals, _, attrs = run(tmp_path, edf_writer, channels)
    assert amplitude(night_signals[signals.SLOTS.index("SPO2")].astype(float), 0.05, skip_s=120) == pytest.approx(3, rel=0.02)
    assert amplitude(night_signals[signals.SLOTS.index("THOR")].astype(float), 0.05, skip_s=120) == pytest.approx(2, rel=0.02)
    assert attrs["present"] == [True, True, True, True, True, True, False]   # no abdomen channel


def test_out_of_band_is_attenuated(tmp_path, edf_writer):
    # 45 Hz in the EEG (pass-band ends at 30 Hz), 2 Hz in SpO2 (low-pass 0.4 Hz), 3 Hz in a belt (0.5 Hz).
    channels = base_channels(256, sine(256, 45, 50), spo2=sine(10, 2, 3, offset=95), spo2_fs=10,
                             thor=sine(32, 3, 2), thor_fs=32)
    night_signals, _, _ = run(tmp_path, edf_writer, channels)
    assert amplitude(night_signals[3].astype(float), 45) < 0.5 * 50
    assert amplitude(night_signals[4].astype(float), 2) < 0.1 * 3
    assert amplitude(night_signals[5].astype(float), 3) < 0.1 * 2


def test_spikes_removed_by_median(tmp_path, edf_writer):
    x = sine(125, 5, 50)
    x[::997] = 700.0                      # single-sample electrode pops
    channels = base_channels(125, x)
    night_signals, _, _ = run(tmp_path, edf_writer, channels)
    eeg = night_signals[3].astype(float)
    assert np.abs(eeg[125 * 60:]).max() < 80   # the 5-Hz wave (50 µV) survives, the 700-µV pops do not


def test_median3_equals_scipy():
    x = np.random.default_rng(1).normal(size=1001)
    assert np.array_equal(signals.median3(x), scipy.ndimage.median_filter(x, size=3, mode="nearest"))


def test_causal_default_and_zero_phase_option(tmp_path, edf_writer):
    # The paper's causal sosfilt never responds before an impulse; sosfiltfilt (the option) does.
    impulse = np.zeros(2001)
    impulse[1000] = 1.0
    causal = signals.butterworth(impulse, "EEG", 125)
    zero = signals.butterworth(impulse, "EEG", 125, zero_phase=True)
    assert np.all(causal[:1000] == 0) and np.abs(zero[:1000]).max() > 1e-3
    channels = base_channels(125, sine(125, 5, 50))
    _, _, attrs = run(tmp_path, edf_writer, channels)
    _, _, attrs_zero = run(tmp_path, edf_writer, channels, Options(zero_phase=True))
    assert attrs["filters"]["butterworth_pass"].startswith("sosfilt (causal")
    assert attrs_zero["filters"]["butterworth_pass"].startswith("sosfiltfilt")


def test_resolution_prefers_first_candidate_and_derivations():
    table = {"EEG": [["C4", ("A1", "M1")], "C3-M2"], "EMG": [("L Chin", "LChin")]}
    chosen = signals.resolve(["C3-M2", "c4 ", "M1", "L_Chin"], table)
    assert chosen["EEG"] == ("c4 ", "M1") and chosen["EMG"] == ("L_Chin", None) and chosen["ECG"] is None
    # --channels: a verbatim label wins even if it contains '-', 'A - B' derives, None is absent.
    chosen = signals.resolve(["C4-M1", "E1", "M2"], table, {"EEG": "C4-M1", "EOG": "E1 - M2", "EMG": None})
    assert chosen["EEG"] == ("C4-M1", None) and chosen["EOG"] == ("E1", "M2") and chosen["EMG"] is None
    with pytest.raises(signals.SlotError, match="slot EOG: --channels names 'E1 - M9' but the EDF has no 'M9'"):
        signals.resolve(["E1", "M2"], table, {"EOG": "E1 - M9"})


def test_wrong_units_fail_required_slot(tmp_path, edf_writer):
    # An EEG stored in V but labelled 'uV': amplitude 5e-5 "µV" is implausible.
    channels = base_channels(125, sine(125, 5, 50e-6), rng_scale=1e-6)
    with pytest.raises(PrepareError, match=r"required slot EEG: signal 'C4-M1' has amplitude .* wrong physical dimension"):
        run(tmp_path, edf_writer, channels)
    channels = base_channels(125, sine(125, 5, 50), dim="furlong")
    with pytest.raises(PrepareError, match=r"required slot EEG: signal 'C4-M1' has physical dimension 'furlong'"):
        run(tmp_path, edf_writer, channels)


def test_flat_optional_slot_is_absent_with_warning(tmp_path, edf_writer):
    channels = base_channels(125, sine(125, 5, 50), spo2=np.full(DURATION_S, 97.0))
    night_signals, _, attrs = run(tmp_path, edf_writer, channels)
    assert attrs["present"][4] is False and not night_signals[4].any()
    assert any("slot SPO2: signal 'SpO2' is flat" in w for w in attrs["warnings"])
    with pytest.raises(PrepareError, match="required slot SPO2: signal 'SpO2' is flat"):
        run(tmp_path, edf_writer, channels, Options(required=signals.SLOTS))


def test_flat_required_slot_fails(tmp_path, edf_writer):
    channels = base_channels(125, np.zeros(DURATION_S * 125))
    with pytest.raises(PrepareError, match="required slot EEG: signal 'C4-M1' is flat"):
        run(tmp_path, edf_writer, channels)


def test_nans_are_interpolated_and_counted():
    x = np.sin(np.arange(100) / 5.0)
    x[10:15] = np.nan
    filled, n = signals.fill_nans(x, "EEG", "C4")
    assert n == 5 and np.isfinite(filled).all()
    assert np.allclose(filled[10:15], np.linspace(x[9], x[15], 7)[1:-1])
    with pytest.raises(signals.SlotError, match="slot EEG: signal 'C4' is all NaN"):
        signals.fill_nans(np.full(10, np.nan), "EEG", "C4")


def test_a_mostly_nan_signal_is_unusable():
    x = np.sin(np.arange(100) / 5.0)
    x[:50] = np.nan                                    # half: interpolated (edges held)
    filled, n = signals.fill_nans(x, "EEG", "C4")
    assert n == 50 and np.all(filled[:50] == x[50])
    x[50] = np.inf
    with pytest.raises(signals.SlotError) as failed:
        signals.fill_nans(x, "EEG", "C4")
    assert str(failed.value) == "slot EEG: signal 'C4' is 51% NaN (51 of 100 samples), more than the 50% that is interpolated"


NO_ABDOMEN = "slot ABDO: none of its labels is in the EDF"      # base_channels has no abdomen belt


def test_mains_hum_only_warns_on_the_raw_signal(tmp_path, edf_writer):
    for fs, mains in ((256, 50), (200, 60), (100, 50)):          # 100 Hz: 50 Hz sits at Nyquist
        _, _, attrs = run(tmp_path, edf_writer, base_channels(fs, sine(fs, mains, 30)))
        assert attrs["present"][signals.SLOTS.index("EEG")] is True
        assert attrs["warnings"] == [f"slot EEG: signal 'C4-M1' is mains hum only ({mains} Hz and its harmonics carry "
                                     f"100% of the power above 0.3 Hz): electrode off?", NO_ABDOMEN]
    # hum (power 450 + 50 µV²) with its harmonic and white noise (9 µV² over 0-128 Hz, 96 % of it outside the two
    # ±1-Hz windows): 500 / (500 + 0.96 × 9) = 0.983 of the power is hum
    rng = np.random.default_rng(2)
    hum = sine(256, 50, 30) + sine(256, 100, 10) + rng.normal(0, 3, DURATION_S * 256)
    assert signals.mains_hum(hum, 256) == (50.0, pytest.approx(0.983, abs=0.004))


def test_eeg_with_some_mains_does_not_warn(tmp_path, edf_writer):
    """A real-looking EEG (1/f background 40 µV, 10-Hz alpha) with 20 µV of 50-Hz pickup is staged without a word."""
    fs, rng = 256, np.random.default_rng(3)
    brown = np.cumsum(rng.normal(0, 1, DURATION_S * fs))
    background = brown - np.convolve(brown, np.ones(fs) / fs, "same")
    eeg = 40 * background / background.std() + sine(fs, 10, 20) + sine(fs, 50, 20)
    assert signals.mains_hum(eeg, fs) is None
    _, _, attrs = run(tmp_path, edf_writer, base_channels(fs, eeg))
    assert attrs["warnings"] == [NO_ABDOMEN] and attrs["present"][signals.SLOTS.index("EEG")] is True
    # nor does noise, a 5-Hz wave, or a 45-Hz one (near, not at, the mains)
    assert signals.mains_hum(rng.normal(0, 20, 600 * fs), fs) is None
    assert signals.mains_hum(sine(fs, 5, 50), fs) is None and signals.mains_hum(sine(fs, 45, 50), fs) is None


def test_nanovolts_are_a_voltage():
    assert signals.microvolt_factor("nV", "EEG", "C4") == 1e-3 == signals.microvolt_factor(" NV ", "EEG", "C4")
    with pytest.raises(signals.SlotError) as failed:
        signals.microvolt_factor("furlong", "EEG", "C4")
    assert str(failed.value) == "slot EEG: signal 'C4' has physical dimension 'furlong', not a voltage (nV, uV, mV, V)"


def test_arrays_below_the_slots_rate_are_refused():
    """An array's rate meets the EDF's rule (MIN_FS): a 25-Hz EEG cannot carry its 0.3-30 Hz band."""
    from prepare.night import prepare_arrays
    rng = np.random.default_rng(4)
    arrays = {slot: (rng.normal(0, 20, 60 * 100), 100, "uV") for slot in ("EOG", "EMG")}
    with pytest.raises(PrepareError) as failed:
        prepare_arrays({**arrays, "EEG": (rng.normal(0, 20, 60 * 25), 25, "uV")}, Options())
    assert str(failed.value) == "required slot EEG: signal 'EEG' is sampled at 25 Hz, below the 50 Hz its 0.3-30 Hz band needs"


def test_clean_spo2_interpolates_dropouts():
    x = np.array([95.0, 96, 0, 0, 98, 97])
    cleaned, n = signals.clean_spo2(x)
    assert n == 2 and np.allclose(cleaned, [95, 96, 96 + 2 / 3, 96 + 4 / 3, 98, 97])


def test_the_plausibility_of_a_long_signal_is_read_off_contiguous_runs():
    """check_plausible on an 8-h signal takes 64 runs of it, not a stride: a 50-Hz sine sampled at 100 Hz (every
    16th sample would hit one phase and read 0 µV) passes; the same samples in volts declared as µV fail."""
    t = np.arange(8 * 3600 * 100) / 100
    x = 50 * np.sin(2 * np.pi * 50 * t + 0.3)                                    # ±14.8 µV at the samples
    signals.check_plausible(x, "EEG", "C4-M1")
    with pytest.raises(signals.SlotError, match=r"slot EEG: signal 'C4-M1' has amplitude 1.48e-05 uV"):
        signals.check_plausible(x * 1e-6, "EEG", "C4-M1")
