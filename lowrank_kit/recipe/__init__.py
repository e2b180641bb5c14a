"""Recipes: the typed sections (spec), YAML loading and validation (loading), the schema helpers, the reference doc."""
