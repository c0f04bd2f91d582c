"""Model definitions (one file per HF model_type), the loader and per-step batch metadata."""
