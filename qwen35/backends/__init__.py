"""Fast paths the reference model does not know about. The engine's runner picks one (`cpu.decoder_for`); each
runs the same maths as `qwen35.models` on the model's weights and the engine's cache, and is tested against it."""
