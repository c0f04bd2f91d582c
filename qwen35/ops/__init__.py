"""Pure tensor functions; each file holds a reference beside its fast path."""
