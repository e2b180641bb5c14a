"""The comparison harness: recipes × ratios on one model and data."""
