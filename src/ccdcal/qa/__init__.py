"""Measurements of frames: region statistics, frame QA metrics, outliers of a calibration group."""
