"""Training and fine-tuning: packed-sample losses (loss.py, mtp.py), chat and text data (data.py), LoRA (lora.py),
the training loop and `finetune` (trainer.py), HF checkpoints and PEFT adapters on disk (checkpoint.py), and the
demo model's offline corpus (corpus.py)."""

from qwen35.train.checkpoint import save_adapter, save_checkpoint
from qwen35.train.trainer import TrainConfig, TrainResult, finetune, train

__all__ = ["TrainConfig", "TrainResult", "finetune", "save_adapter", "save_checkpoint", "train"]
