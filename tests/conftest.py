import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(kind, **overrides) -> (dir, hf_model); built once per distinct request in a session."""
    from tests.tiny_models import build

    made = {}

    def get(kind: str, seed: int = 0, max_shard_size=None, **overrides):
        key = (kind, seed, max_shard_size, repr(sorted(overrides.items())))
        if key not in made:
            d = tmp_path_factory.mktemp(f"ckpt-{kind}")
            made[key] = (d, build(kind, d, seed=seed, max_shard_size=max_shard_size, **overrides))
        return made[key]

    return get
