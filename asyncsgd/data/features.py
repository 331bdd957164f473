"""Log-mel speech features in numpy: framing, power spectrum, mel filterbank, log, normalisation, fixed length.

The pipeline for one utterance (int16 or float samples at ``sample_rate`` Hz), all parameters in
:class:`LogMelConfig` and stored as attributes of the files written with it:

1. scale to [-1, 1), pre-emphasis y[t] = x[t] - 0.97 x[t-1] (flattens the speech spectrum's -6 dB/octave tilt);
2. frames of 25 ms every 10 ms (200 / 80 samples at 8 kHz), Hamming window, a signal shorter than one window is
   zero-padded to one window; frame count T = 1 + (n - win) // hop;
3. power spectrum |FFT|^2 with n_fft = 512 (zero-padded: finer bins for the narrow low mel bands);
4. 40 triangular mel bands (HTK mel scale, 20 Hz to Nyquist, unit peak), evaluated at the FFT bin frequencies;
5. log of the band energies with a floor 80 dB below the utterance's loudest band energy (digital silence gives
   -80 dB, not -inf);
6. fixed length ``frames``: an utterance longer than that keeps the window of ``frames`` frames with the most
   energy (sum of frame power; earliest on ties); a shorter one is centred, padded on both sides (left gets
   the smaller half);
7. per-utterance normalisation over the kept (unpadded) frames: subtract the mean and divide by the standard
   deviation of all its values (one scalar each, so the spectral shape survives while the recording level, a
   constant in the log domain, is removed); padding gets the normalised utterance's minimum (quiet).

Output: float32 [n_mels, frames], i.e. H = mel band (low to high frequency), W = time.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["LogMelConfig", "log_mel", "mel_filterbank", "frame_signal", "fix_length", "hz_to_mel", "mel_to_hz"]


@dataclass(frozen=True)
class LogMelConfig:
    """Parameters of the log-mel pipeline (defaults: FSDD at 8 kHz -> 40 x 64 features)."""
    sample_rate: int = 8000
    win_ms: float = 25.0
    hop_ms: float = 10.0
    n_fft: int = 512
    n_mels: int = 40
    fmin: float = 20.0
    fmax: float | None = None        # None: sample_rate / 2
    preemphasis: float = 0.97
    floor_db: float = 80.0
    frames: int = 64

    @property
    def win(self) -> int:
        """Window length in samples."""
        return int(round(self.sample_rate * self.win_ms / 1000))

    @property
    def hop(self) -> int:
        """Hop length in samples."""
        return int(round(self.sample_rate * self.hop_ms / 1000))

    def attrs(self) -> dict:
        """Return the parameters as HDF5 attributes (flat str/int/float values)."""
        d = asdict(self)
        d["fmax"] = float(self.fmax if self.fmax is not None else self.sample_rate / 2)
        d["win_samples"], d["hop_samples"] = self.win, self.hop
        d["feature"] = "log-mel"
        d["window"] = "hamming"
        d["mel_scale"] = "htk"
        d["normalisation"] = "per-utterance mean/std over kept frames (scalar)"
        d["length_rule"] = ("longer: keep the max-energy window of `frames` frames; shorter: centre and pad "
                            "with the normalised utterance minimum")
        return d


def hz_to_mel(f):
    """HTK mel scale: 2595 log10(1 + f / 700)."""
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def mel_to_hz(m):
    """Inverse of :func:`hz_to_mel`."""
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(cfg: LogMelConfig) -> np.ndarray:
    """Return the [n_mels, n_fft // 2 + 1] triangular filter weights (peak 1) on the rfft bin frequencies."""
    fmax = cfg.fmax if cfg.fmax is not None else cfg.sample_rate / 2
    if not 0 <= cfg.fmin < fmax <= cfg.sample_rate / 2:
        raise ValueError(f"need 0 <= fmin < fmax <= sample_rate/2, got fmin={cfg.fmin}, fmax={fmax}")
    edges = mel_to_hz(np.linspace(hz_to_mel(cfg.fmin), hz_to_mel(fmax), cfg.n_mels + 2))
    bins = np.fft.rfftfreq(cfg.n_fft, d=1.0 / cfg.sample_rate)
    lo, centre, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins[None, :] - lo) / (centre - lo)
    falling = (hi - bins[None, :]) / (hi - centre)
    return np.maximum(0.0, np.minimum(rising, falling))


def frame_signal(signal: np.ndarray, win: int, hop: int) -> np.ndarray:
    """Return [T, win] overlapping frames (a view when possible); a signal shorter than ``win`` is zero-padded."""
    if len(signal) < win:
        signal = np.pad(signal, (0, win - len(signal)))
    n_frames = 1 + (len(signal) - win) // hop
    return np.lib.stride_tricks.sliding_window_view(signal, win)[::hop][:n_frames]


def fix_length(logmel: np.ndarray, energy: np.ndarray, frames: int):
    """Crop [n_mels, T] to the max-energy window of ``frames`` frames, or centre it in ``frames`` columns.

    Returns (features [n_mels, frames], kept [frames] bool mask of real, unpadded columns).
    """
    n_mels, t = logmel.shape
    kept = np.zeros(frames, dtype=bool)
    if t >= frames:
        sums = np.convolve(energy, np.ones(frames), mode="valid")   # sums[s] = energy[s:s+frames].sum()
        start = int(np.argmax(sums))
        kept[:] = True
        return logmel[:, start:start + frames], kept
    left = (frames - t) // 2
    out = np.zeros((n_mels, frames), dtype=logmel.dtype)
    out[:, left:left + t] = logmel
    kept[left:left + t] = True
    return out, kept


class _Extractor:
    """Cached filterbank and window for one config (building them per utterance would dominate the cost)."""

    def __init__(self, cfg: LogMelConfig):
        self.cfg = cfg
        self.fbank = mel_filterbank(cfg)
        self.window = np.hamming(cfg.win)

    def __call__(self, samples) -> np.ndarray:
        cfg = self.cfg
        x = np.asarray(samples)
        if x.ndim != 1 or x.size == 0:
            raise ValueError(f"need a non-empty 1-D signal, got shape {x.shape}")
        x = x.astype(np.float64) / 32768.0 if x.dtype.kind in "iu" else x.astype(np.float64)
        x = np.append(x[0], x[1:] - cfg.preemphasis * x[:-1])
        frames = frame_signal(x, cfg.win, cfg.hop) * self.window
        power = np.abs(np.fft.rfft(frames, n=cfg.n_fft, axis=1)) ** 2          # [T, n_fft/2+1]
        mel = power @ self.fbank.T                                              # [T, n_mels]
        floor = max(mel.max(), 1e-30) * 10.0 ** (-cfg.floor_db / 10.0)
        logmel = np.log(np.maximum(mel, floor)).T                               # [n_mels, T]
        out, kept = fix_length(logmel, power.sum(axis=1), cfg.frames)
        real = out[:, kept]
        mean, std = real.mean(), real.std()
        out = (out - mean) / max(std, 1e-5)
        out[:, ~kept] = out[:, kept].min()
        return out.astype(np.float32)


_CACHE: dict = {}


def log_mel(samples, cfg: LogMelConfig = LogMelConfig()) -> np.ndarray:
    """Return float32 [n_mels, frames] normalised log-mel features of one utterance (see the module docstring)."""
    ext = _CACHE.get(cfg)
    if ext is None:
        ext = _CACHE[cfg] = _Extractor(cfg)
    return ext(samples)
