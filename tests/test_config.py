"""TransformerConfig validation: every bad value is refused naming the field (property tests)."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evotorch_mqa_moe import TransformerConfig
from evotorch_mqa_moe.model.config import MAX_SEQ_LEN


def make(**changes):
    base = dict(vocab_size=5, embed_dim=8, num_heads=2, expert_dim=8, num_experts=2,
                max_seq_len=4)
    base.update(changes)
    return TransformerConfig(**base)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 5),
                 st.booleans()))
def test_norm_eps_is_accepted_exactly_when_finite_and_positive(eps):
    good = not isinstance(eps, bool) and math.isfinite(eps) and eps > 0
    if good:
        assert make(norm_eps=eps).norm_eps == eps
    else:
        with pytest.raises(ValueError, match="norm_eps"):
            make(norm_eps=eps)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.integers(-(2**70), 2**70), st.integers(MAX_SEQ_LEN - 3, MAX_SEQ_LEN + 3)))
def test_max_seq_len_is_accepted_exactly_in_one_to_the_bound(length):
    if 1 <= length <= MAX_SEQ_LEN:
        assert make(max_seq_len=length).max_seq_len == length
    else:
        with pytest.raises(ValueError, match="max_seq_len"):
            make(max_seq_len=length)


@pytest.mark.parametrize("eps", [math.inf, -math.inf, math.nan, 0.0, -1e-5, True])
def test_norm_eps_rejects_non_finite_and_non_positive(eps):
    with pytest.raises(ValueError, match=f"norm_eps must be a positive number, got {eps!r}"):
        make(norm_eps=eps)


def test_max_seq_len_upper_bound_is_named():
    with pytest.raises(ValueError, match=f"at most {MAX_SEQ_LEN}.*got 1000000000000"):
        make(max_seq_len=10**12)
    assert make(max_seq_len=MAX_SEQ_LEN).max_seq_len == MAX_SEQ_LEN
