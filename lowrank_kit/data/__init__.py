"""Bundled texts (Jane Austen) and the functions that turn texts into calibration and evaluation windows."""
