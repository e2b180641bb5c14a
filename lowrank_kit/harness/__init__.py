"""The comparison harness: recipes × ratios on one model and data (``bench``), and dense against
compressed speed on this machine (``speed``)."""
