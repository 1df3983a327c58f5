"""engines/tempo.py: speech played faster or slower keeps its pitch and takes 1/speed of the time."""

import numpy as np
import pytest

from lllmsd.engines.tempo import change_tempo

RATE = 22050


def tone(seconds: float, hertz: float) -> np.ndarray:
    return (np.sin(np.arange(round(seconds * RATE)) * 2 * np.pi * hertz / RATE) * 10_000).astype(np.int16)


def dominant_hertz(samples: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(samples.astype(np.float64)))
    return float(np.fft.rfftfreq(samples.size, 1 / RATE)[np.argmax(spectrum)])


@pytest.mark.parametrize("speed", [0.25, 0.5, 0.8, 2.0, 4.0])
def test_duration_is_one_over_speed_and_pitch_is_kept(speed: float) -> None:
    source = tone(2.0, 220.0)
    changed = change_tempo(source, RATE, speed)
    assert changed.dtype == np.int16
    assert changed.size / source.size == pytest.approx(1 / speed, rel=0.03)  # atempo drops part of a last window
    assert dominant_hertz(changed) == pytest.approx(220.0, abs=5)


def test_speed_one_and_silence_of_nothing_pass_through() -> None:
    source = tone(0.5, 440.0)
    assert change_tempo(source, RATE, 1.0) is source
    assert change_tempo(np.zeros(0, dtype=np.int16), RATE, 2.0).size == 0
