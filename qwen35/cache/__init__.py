"""The hybrid cache: KV blocks and recurrent-state slots (tensors and bookkeeping)."""
