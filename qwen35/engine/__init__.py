"""The engine: requests, scheduler, model runner, sampler, joined by LLMEngine.step()."""
