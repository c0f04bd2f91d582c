"""Training and fine-tuning: losses over packed samples (loss.py)."""
