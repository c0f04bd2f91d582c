"""StructuredOutputs' mask kernels: `apply_masks` against the plain unpack-and-compare it replaced, on awkward
shapes (logits narrower than the mask, widths off the byte and word grid, bits set past the logits), and
`fill_masks` against llguidance's own per-matcher bitmask."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qwen35.demo import DEMO_DIR
from qwen35.engine.structured import StructuredOutputs
from qwen35.sampling_params import StructuredOutputsParams
from qwen35.tokenizer import Tokenizer


def reference_apply(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The first implementation: unpack every bit, compare to 0, fill, and reduce the comparison."""
    bits = np.unpackbits(masks.numpy().view(np.uint8), axis=-1, bitorder="little")[:, :logits.shape[-1]]
    disallowed = torch.from_numpy(bits) == 0
    logits.masked_fill_(disallowed, float("-inf"))
    return disallowed.all(-1)


def mask_cases(batch: int, words: int, width: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(batch * 1000 + width)
    random = torch.randint(-2**31, 2**31 - 1, (batch, words), dtype=torch.int32, generator=g)
    sparse = torch.zeros(batch, words, dtype=torch.int32)
    sparse[:, 0] = 1 << 3  # id 3 only
    bits = np.zeros((batch, words * 32), dtype=np.uint8)
    bits[:, width:] = 1  # only ids at or past the logits' width
    past = torch.from_numpy(np.packbits(bits, axis=-1, bitorder="little").view(np.int32).copy())
    mixed = random.clone()
    mixed[0] = 0  # one row allowing nothing, the others random
    return [random, torch.full((batch, words), -1, dtype=torch.int32), torch.zeros(batch, words, dtype=torch.int32),
            sparse, past, mixed]


@pytest.mark.parametrize("vocab_size", [70, 96, 8])
@pytest.mark.parametrize("batch", [1, 3])
def test_apply_masks_matches_the_reference(vocab_size, batch):
    so = StructuredOutputs(None, vocab_size)
    for width in sorted({vocab_size, vocab_size - 1, 64, 33, 8, 7, 1} - {0}):
        if width > vocab_size:
            continue
        for masks in mask_cases(batch, so.num_words, width):
            base = torch.randn(batch, width, generator=torch.Generator().manual_seed(width))
            ours, ref = base.clone(), base.clone()
            empty = so.apply_masks(ours, masks.clone())
            ref_empty = reference_apply(ref, masks.clone())
            assert torch.equal(ours, ref), (vocab_size, batch, width)
            assert empty.tolist() == ref_empty.tolist(), (vocab_size, batch, width)


def test_apply_masks_on_chosen_rows_matches_copying_them_out_and_back():
    """Masks applied in place on some rows of a batch, as the engine's copy-out / apply / copy-back did."""
    so = StructuredOutputs(None, 70)
    for width, rows in ((70, [3, 0]), (65, [1]), (33, [0, 1, 2, 3]), (9, [2, 3])):
        base = torch.randn(4, width, generator=torch.Generator().manual_seed(width))
        for masks in mask_cases(len(rows), so.num_words, width):
            ours, ref = base.clone(), base.clone()
            empty = so.apply_masks(ours, masks.clone(), rows)
            sub = ref[rows]
            ref_empty = reference_apply(sub, masks.clone())
            ref[rows] = sub
            assert torch.equal(ours, ref), (width, rows)
            assert empty.tolist() == ref_empty.tolist(), (width, rows)


def test_apply_masks_on_no_rows():
    so = StructuredOutputs(None, 40)
    logits = torch.zeros(0, 40)
    assert so.apply_masks(logits, torch.zeros(0, so.num_words, dtype=torch.int32)).shape == (0,)


def test_fill_masks_matches_llguidance_bitmask():
    """Rows of matchers in different states, each equal to the matcher's own compute_bitmask()."""
    tok = Tokenizer.from_dir(DEMO_DIR)
    so = StructuredOutputs(tok, tok.vocab_size)
    c = StructuredOutputsParams(json={"type": "object", "properties": {"a": {"type": "integer"},
                                                                       "b": {"enum": ["x", "yy"]}},
                                      "required": ["a", "b"]})
    matchers = [so.matcher(c, [0]) for _ in range(3)]
    for k, m in enumerate(matchers):  # advance matcher k by k tokens of a valid document
        for t in tok.encode('{"a":12,"b":"yy"}')[:2 * k]:
            m.accept(t, False)
    masks = so.fill_masks(matchers)
    assert masks.shape == (3, so.num_words) and masks.dtype == torch.int32
    for i, m in enumerate(matchers):
        expected = np.frombuffer(m.matcher.compute_bitmask(), dtype=np.int32)
        assert np.array_equal(masks[i].numpy(), expected[:so.num_words]), i
    assert len({bytes(masks[i].numpy()) for i in range(3)}) == 3  # the states differ
