"""Frame metrics of a finite frame are those that ignore NaN (from the whole-night suite of issue 12)."""

from __future__ import annotations

import numpy as np


def test_frame_metrics_of_a_finite_frame_are_those_that_ignore_nan():
    """The scan's block and column medians use numpy's plain median when the sample has no NaN;
    numpy's nanmedian of the same sample (computed here) gives the same numbers; with NaN in
    the frame the NaN-aware path is taken."""
    from ccdcal.qa.stats import frame_metrics

    rng = np.random.default_rng(4)
    for shape in ((512, 512), (300, 700), (1024, 999)):
        frame = rng.normal(1000, 7, shape).round().astype(np.float32)
        frame[:, ::37] += 3                                   # a column pattern
        got = frame_metrics(frame)
        k = max(1, int(np.sqrt(frame.size / 65536.0)))
        sample = frame[::k, ::k].astype(np.float64)
        columns = np.nanmedian(sample, axis=0)
        assert got["column_pattern"] == 1.482602218505602 * float(np.median(np.abs(columns - np.median(columns))))
        ny, nx = sample.shape
        by, bx = ny // 8, nx // 8
        blocks = np.nanmedian(sample[: 8 * by, : 8 * bx].reshape(8, by, 8, bx).swapaxes(1, 2).reshape(8, 8, -1), axis=2)
        assert got["gradient"] == float(blocks.max() - blocks.min())
        holed = frame.copy()
        holed[::k, ::k][::5, ::3] = np.nan
        with np.errstate(invalid="ignore"):
            assert np.isfinite(frame_metrics(holed)["gradient"])
