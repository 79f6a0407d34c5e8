"""Which background noise a spoken clip holds, found in its samples alone (not from the synthesizer's draws).

`petl_apps.speech.spoken_clip` centres the word in silence, then maybe adds a stretch of one background noise to
the whole clip. So a clean clip starts with exact zeros, and a noisy clip's first samples, before the word, are
that noise scaled: the one noise file and offset whose stretch matches them (normalised correlation ~1).
"""

from __future__ import annotations

import numpy as np
from scipy.signal import correlate

LEADING = 1600  # samples before the word (0.1 s): the demo's words are shorter than 0.8 s, centred in 1 s
CLEAN = 400  # a clean clip's first samples are all exactly zero


def heard_noise(clip: np.ndarray, noises: dict[str, np.ndarray]) -> tuple[str, int | None]:
    """("none", None) for a clean clip, else (the name of the noise in `noises`, its first sample in the clip)."""
    clip = np.asarray(clip, dtype=np.float64)
    if not clip[:CLEAN].any():
        return "none", None
    leading = clip[:LEADING]
    best = (0.0, "", -1)
    for name, noise in noises.items():
        noise = np.asarray(noise, dtype=np.float64)
        energy = np.concatenate([[0.0], np.cumsum(noise**2)])
        window = np.sqrt(energy[LEADING:] - energy[:-LEADING])
        similarity = correlate(noise, leading, mode="valid", method="fft") / (window * np.linalg.norm(leading) + 1e-12)
        start = int(np.argmax(similarity))
        if similarity[start] > best[0]:
            best = (float(similarity[start]), name, start)
    assert best[0] > 0.999, f"no background noise matches the clip's start (best: {best})"
    return best[1], best[2]
