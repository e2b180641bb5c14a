"""Compressed modules, the factorisation base of transforms, rank plans, spectra and generation-time decoding."""
