"""Sampling statistics on known logits: each filter and penalty does what vLLM's does, and seeds reproduce."""

import math

import pytest
import torch

from qwen35.engine.sampler import SampleRow, apply_penalties, filter_logits, sample, sample_row
from qwen35.sampling_params import SamplingParams

LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -3.0, float("-inf")])


def draw(params: SamplingParams, n=10000, logits=LOGITS, seed=0):
    g = torch.Generator().manual_seed(seed)
    row = SampleRow(params, [], [], g, [])
    counts = torch.zeros(len(logits))
    for _ in range(n):
        counts[sample(logits[None], [row])[0]] += 1
    return counts / n


def expected(logits):
    return torch.softmax(logits, -1)


def close(freq, probs, n=10000):
    # 5 standard errors of a binomial proportion, per token
    se = torch.sqrt(probs * (1 - probs) / n) + 1e-9
    return bool(((freq - probs).abs() <= 5 * se + 1e-4).all())


@pytest.mark.parametrize("t", [1.0, 0.5, 2.0])
def test_temperature_frequencies(t):
    assert close(draw(SamplingParams(temperature=t)), expected(LOGITS / t))


def test_top_k_keeps_exactly_k():
    freq = draw(SamplingParams(temperature=1.0, top_k=3))
    assert close(freq, expected(torch.cat([LOGITS[:3], torch.full((5,), float("-inf"))])))


def test_top_p_keeps_smallest_prefix_reaching_p():
    p = expected(LOGITS)
    # cumulative: 0.42, 0.67, 0.83, ...: top_p 0.8 keeps the first three
    assert p[:2].sum() < 0.8 < p[:3].sum()
    freq = draw(SamplingParams(temperature=1.0, top_p=0.8))
    assert close(freq, expected(torch.cat([LOGITS[:3], torch.full((5,), float("-inf"))])))


def test_min_p_drops_tokens_below_fraction_of_max():
    p = expected(LOGITS)
    keep = p >= 0.3 * p.max()
    freq = draw(SamplingParams(temperature=1.0, min_p=0.3))
    assert close(freq, expected(LOGITS.masked_fill(~keep, float("-inf"))))


def test_greedy_and_seeded_reproducibility():
    assert draw(SamplingParams(temperature=0), n=50)[0] == 1.0
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    s1 = [sample(LOGITS[None], [SampleRow(SamplingParams(), [], [], g1, [])])[0] for _ in range(50)]
    s2 = [sample(LOGITS[None], [SampleRow(SamplingParams(), [], [], g2, [])])[0] for _ in range(50)]
    assert s1 == s2 and len(set(s1)) > 1


def test_penalties_follow_vllm_formulas():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5, -0.5])
    row = SampleRow(SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25),
                    prompt_ids=[0, 1], output_ids=[2, 2, 3], generator=None, banned_ids=[])
    out = apply_penalties(logits.clone(), row)
    # repetition over prompt+output (0, 1, 2, 3): positive / 2, negative * 2; then presence/frequency on output
    want = torch.tensor([1.0, -4.0, 0.5 - 0.5 - 0.5, 0.25 - 0.5 - 0.25, -0.5])
    torch.testing.assert_close(out, want)


def test_banned_ids_and_padded_vocab_never_sampled():
    row = SampleRow(SamplingParams(temperature=1.0), [], [], torch.Generator().manual_seed(0), banned_ids=[0, 1])
    for _ in range(200):
        tok = sample(LOGITS[None], [row])[0]
        assert tok not in (0, 1, 7)


def test_filter_order_temperature_before_top_p():
    lg = filter_logits(LOGITS.clone(), SamplingParams(temperature=0.25, top_p=0.9))
    # at T=0.25 the top token holds > 0.86 and the second brings it past 0.9: exactly two survive
    assert torch.isfinite(lg).sum() == 2 and math.isfinite(lg[0]) and math.isfinite(lg[1])


def test_extreme_finite_values_give_valid_tokens():
    # A temperature past float32's range flattens the logits (it used to turn -inf / inf into NaN); a top_p below
    # float32's resolution keeps the top token; a huge repetition penalty on a zero logit gives no inf * 0 = NaN.
    logits = torch.tensor([2.0, 0.0, -1.0, float("-inf")])
    freq = draw(SamplingParams(temperature=1e308), n=3000, logits=logits)
    assert freq[3] == 0 and close(freq, torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0]), n=3000)
    assert draw(SamplingParams(temperature=1.0, top_p=1e-300), n=50, logits=logits)[0] == 1.0
    # seen ids 0 and 1 become ~0+ and 0: greedy keeps 0, a draw sees three near-equal finite logits
    assert sample(logits[None], [SampleRow(SamplingParams(temperature=0, repetition_penalty=1e308), [0, 1], [],
                                           None, [])]) == [0]
    row = SampleRow(SamplingParams(temperature=1.0, repetition_penalty=1e308), [0, 1], [],
                    torch.Generator().manual_seed(0), [])
    assert {sample(logits[None], [row])[0] for _ in range(100)} == {0, 1, 2}


def test_a_row_with_nothing_to_draw_raises_instead_of_naming_an_arbitrary_id():
    logits = torch.tensor([[2.0, 1.0, 0.0], [1.0, 2.0, 3.0]])
    banned_all = SampleRow(SamplingParams(temperature=0), [], [], None, [0, 1, 2])
    with pytest.raises(ValueError, match="no token can be sampled"):
        sample_row(logits[0], banned_all)
    with pytest.raises(ValueError, match="no token can be sampled"):
        sample_row(torch.full((3,), float("nan")), SampleRow(SamplingParams(), [], [], torch.Generator(), []))
    assert sample_row(logits[1], SampleRow(SamplingParams(temperature=0), [], [], None, [5])) == 2  # ids past V
    # one NaN among finite logits: a clear error before the draw (on a GPU, multinomial's NaN check is a device
    # assert that would end the server)
    with pytest.raises(ValueError, match="no token can be sampled.*NaN"):
        sample_row(torch.tensor([1.0, float("nan"), 0.0]), SampleRow(SamplingParams(), [], [], torch.Generator(), []))


def test_sampling_a_step_at_once_equals_row_by_row_and_fails_only_the_empty_rows():
    """sample_many (a GPU step's sampling: one host transfer) gives sample_row's token for every row, greedy or
    drawn, plain or with penalties, filters and banned ids, from the same generators; a row of -inf or with a NaN
    gets sample_row's error without failing the others; ties go to the first index."""
    from qwen35.engine.sampler import is_plain_greedy, sample_many

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(9, 50, generator=g)
    logits[1, [7, 9]] = 10.0  # a tie: the first index wins
    logits[2] = float("-inf")
    logits[3, 4] = float("nan")
    logits[8, 5] = float("nan")  # a drawn row with a NaN
    params = [SamplingParams(temperature=0.0)] * 4 + [
        SamplingParams(temperature=0.0, repetition_penalty=1.3), SamplingParams(temperature=0.7, top_k=5, seed=1),
        SamplingParams(temperature=1.0, top_p=0.8, min_p=0.05, logit_bias={3: 5.0}),
        SamplingParams(temperature=0.9, presence_penalty=1.0), SamplingParams(temperature=1.0)]

    def rows():
        return [SampleRow(p, [1, 2], [3], torch.Generator().manual_seed(10 + i), [6] if i == 6 else [])
                for i, p in enumerate(params)]

    got = sample_many(logits, rows())
    for i, (row, tok) in enumerate(zip(rows(), got)):
        if i in (2, 3, 8):
            assert isinstance(tok, ValueError)
            with pytest.raises(ValueError, match="no token can be sampled"):
                sample_row(logits[i], row)
        else:
            assert tok == sample_row(logits[i], row), i
    assert got[1] == 7
    assert [is_plain_greedy(r) for r in rows()] == [True] * 4 + [False] * 5
    assert sample_many(logits[:0], []) == []
