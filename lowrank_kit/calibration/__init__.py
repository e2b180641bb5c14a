"""Calibration statistics: streaming sums gathered by taps on forwards and gradients."""
