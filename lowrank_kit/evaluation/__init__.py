"""Evaluation metrics, one module each, behind a small registry (metrics)."""
