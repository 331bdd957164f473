"""The log-mel pipeline: filterbank, framing, length rule, normalisation; and the shipped fsdd.h5 against a rebuild."""
import os

import h5py
import numpy as np
import pytest

from asyncsgd.data.features import (LogMelConfig, fix_length, frame_signal, hz_to_mel, log_mel, mel_filterbank,
                                    mel_to_hz)
from asyncsgd.data.fsdd import TEST_INDICES, fsdd_features, parse_name
from paths import REPO

RECORDINGS = os.path.join(REPO, "..", "shared", "data", "fsdd", "recordings.tar.gz")
CFG = LogMelConfig()


def tone(freq, seconds=0.5, rate=8000, amplitude=8000, dtype=np.int16):
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(dtype)


def test_config_sizes():
    assert (CFG.win, CFG.hop, CFG.n_mels, CFG.frames) == (200, 80, 40, 64)
    attrs = CFG.attrs()
    assert attrs["fmax"] == 4000.0 and attrs["feature"] == "log-mel"


def test_mel_scale_and_filterbank():
    np.testing.assert_allclose(mel_to_hz(hz_to_mel([0, 700, 4000])), [0, 700, 4000], atol=1e-9)
    assert abs(hz_to_mel(1000) - 1000) < 1.0          # the HTK scale puts 1000 Hz at ~1000 mel
    fb = mel_filterbank(CFG)
    assert fb.shape == (40, 257)
    assert (fb.max(axis=1) > 0.5).all()                # no empty band, even the narrow low ones
    assert (fb >= 0).all() and fb.max() <= 1.0
    peaks = fb.argmax(axis=1)
    assert (np.diff(peaks) >= 0).all() and peaks[0] < peaks[-1]
    with pytest.raises(ValueError, match="fmin"):
        mel_filterbank(LogMelConfig(fmin=5000))


def test_framing_counts():
    assert frame_signal(np.zeros(200), 200, 80).shape == (1, 200)
    assert frame_signal(np.zeros(5200), 200, 80).shape == (63, 200)
    assert frame_signal(np.zeros(50), 200, 80).shape == (1, 200)        # shorter than a window: padded
    x = np.arange(1000.0)
    np.testing.assert_array_equal(frame_signal(x, 200, 80)[2], x[160:360])


def test_fix_length_crops_max_energy_window_and_centres_short_ones():
    logmel = np.arange(100.0)[None].repeat(3, 0)
    energy = np.zeros(100)
    energy[70:80] = 1.0
    out, kept = fix_length(logmel, energy, 20)
    assert kept.all() and out.shape == (3, 20)
    assert out[0, 0] <= 70 and out[0, -1] >= 79          # the window holds all of the energy
    out, kept = fix_length(logmel[:, :7], np.ones(7), 12)  # 5 pad columns: 2 left, 3 right
    assert out.shape == (3, 12) and kept.tolist() == [False] * 2 + [True] * 7 + [False] * 3
    np.testing.assert_array_equal(out[0, 2:9], np.arange(7))


def test_log_mel_of_a_tone_peaks_in_the_right_band_and_is_normalised():
    for freq in (300, 1000, 2500):
        feats = log_mel(tone(freq), CFG)
        assert feats.shape == (40, 64) and feats.dtype == np.float32
        band = int(np.argmax(feats[:, 20:40].mean(axis=1)))
        centres = mel_to_hz(np.linspace(hz_to_mel(20), hz_to_mel(4000), 42))[1:-1]
        assert abs(centres[band] - freq) < 0.1 * freq + 60
    # 0.5 s = 4000 samples = 1 + (4000 - 200) // 80 = 48 frames: 8 padded columns each side at the minimum,
    # real part mean 0 / std 1
    feats = log_mel(tone(1000), CFG)
    real = feats[:, 8:56]
    assert abs(real.mean()) < 1e-4 and abs(real.std() - 1) < 1e-3
    assert (feats[:, :8] == real.min()).all() and (feats[:, 56:] == real.min()).all()
    assert (real[:, 0] != real.min()).any() and (real[:, -1] != real.min()).any()


def test_log_mel_ignores_recording_level():
    # float input (no int16 quantisation noise): a gain is a constant in the log domain, removed by normalisation
    noise = np.random.default_rng(0).normal(0, 0.05, 4000)
    signal = tone(700, amplitude=1.0, dtype=np.float64) + noise
    np.testing.assert_allclose(log_mel(0.01 * signal, CFG), log_mel(0.9 * signal, CFG), atol=1e-4)
    assert not np.allclose(log_mel(signal, CFG), log_mel(tone(1400, amplitude=1.0, dtype=np.float64), CFG), atol=0.1)


def test_log_mel_rejects_empty_signal():
    with pytest.raises(ValueError, match="non-empty"):
        log_mel(np.zeros(0, np.int16), CFG)


def test_fsdd_name_rule():
    assert parse_name("7_jackson_32.wav") == (7, "jackson", 32)
    assert parse_name("recordings/0_george_0.wav") == (0, "george", 0)
    assert parse_name("README.md") is None
    assert list(TEST_INDICES) == [0, 1, 2, 3, 4]


@pytest.mark.skipif(not os.path.exists(RECORDINGS), reason="FSDD recordings not present beside the repository")
def test_shipped_fsdd_rows_match_a_rebuild_from_the_recordings():
    with h5py.File(os.path.join(REPO, "data", "fsdd.h5"), "r") as f:
        shipped = {}
        for split in ("train", "test"):
            names = [n.decode() for n in f[f"{split}/names"][...]]
            # 10 rows of each split, spread over the file
            for row in np.linspace(0, len(names) - 1, 10).astype(int):
                shipped[names[row]] = (split, f[f"{split}/x"][row].astype(np.float32), int(f[f"{split}/y"][row]))
        bits = int(f.attrs.get("mantissa_bits", 10))
        attrs = dict(f.attrs)
    cfg = LogMelConfig(frames=int(attrs["frames"]), n_mels=int(attrs["n_mels"]))
    rebuilt = fsdd_features(RECORDINGS, cfg, only=set(shipped))
    found = 0
    for split in ("train", "test"):
        x, y, stems = rebuilt[split]
        for xi, yi, stem in zip(x, y, stems):
            want_split, want_x, want_y = shipped[stem]
            assert want_split == split and want_y == yi == int(stem[0])
            # equal to the float16 storage precision (relative 2**-(bits+1)), plus slack for FFT rounding
            np.testing.assert_allclose(want_x, xi, rtol=2.0 ** -bits, atol=2e-3)
            found += 1
    assert found == 20
