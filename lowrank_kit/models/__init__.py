"""Models: loading (aliases, GGUF), architecture adapters, value-dim attention, and the transformers internals."""
