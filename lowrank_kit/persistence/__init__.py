"""Saving compressed models and loading them back."""
