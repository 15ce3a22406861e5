"""The IO model of chapter 03: the walked loops against their closed forms, the growth of each loop
order with the SRAM size M, and the FlashAttention-1 paper's measured GPT-2 comparison."""

import itertools

import pytest

from flashcourse import iomodel
from flashcourse.iomodel import block_sizes, flash_attention_io, flash_closed_form, standard_attention_io


@pytest.mark.parametrize("order, backward", list(itertools.product(iomodel.ORDERS, (False, True))))
def test_walked_loops_match_their_closed_forms(order, backward):
    # ragged lengths (1, 17, 129, 1000) included: with T = ⌈N/B⌉ the closed forms are exact for any N
    for N, d, B_r, B_c in itertools.product([1, 17, 129, 1000, 1024], [16, 64, 128], [16, 64, 128], [32, 64, 256]):
        walked = flash_attention_io(N, d, block_m=B_r, block_n=B_c, order=order, backward=backward)
        assert walked.total == flash_closed_form(N, d, block_m=B_r, block_n=B_c, order=order, backward=backward), \
            (N, d, B_r, B_c)


def test_standard_passes_match_their_closed_forms():
    for N, d, backward, mask, dropout in itertools.product([17, 1024], [64], *[(False, True)] * 3):
        kw = dict(backward=backward, mask=mask, dropout=dropout)
        assert standard_attention_io(N, d, **kw).total == iomodel.standard_closed_form(N, d, **kw)
    # the textbook counts, in fp16 elements: 4Nd + 4N² forward, 8Nd + 7N² backward
    N, d = 1024, 64
    assert standard_attention_io(N, d).total == 2 * (4 * N * d + 4 * N * N)
    assert standard_attention_io(N, d, backward=True).total == 2 * (8 * N * d + 7 * N * N)


def test_each_loop_order_falls_as_one_over_m_with_its_own_blocks():
    # the block kept on chip grows with M: traffic ∝ N²d²/M, within a constant of the lower bound
    N, d = 16384, 64
    for order in iomodel.ORDERS:
        ratios = [flash_attention_io(N, d, M, order=order).total / iomodel.lower_bound_shape(N, d, M)
                  for M in (4 * d * d, 16 * d * d, 64 * d * d)]  # M = 16K, 64K, 256K elements
        assert max(ratios) / min(ratios) < 1.3, (order, ratios)
    # FA1: K, V once, Q and O three times per key block: ≈ 12 N²d²/M elements (fp16: × 2 bytes)
    M = 16 * d * d
    assert flash_attention_io(N, d, M, order="fa1").total == pytest.approx(2 * 12 * N * N * d * d / M, rel=0.05)


def test_fa2_loops_with_fa1_blocks_stop_falling_at_two_n_squared():
    # issue 12: with the query block outside and B_r = min(⌈M/4d⌉, d) <= d, K and V are read N/B_r >= N/d
    # times: 2N² elements at best, half of standard attention, at every M >= 4d²
    N, d = 4096, 64
    std = standard_attention_io(N, d).total
    for M in (4 * d * d, 16 * d * d, 256 * d * d):
        B_r, B_c = block_sizes(M, d, "fa1")
        assert B_r == d
        assert flash_attention_io(N, d, block_m=B_r, block_n=B_c, order="fa2").total == pytest.approx(std / 2, rel=0.02)
    # and with query blocks shorter than d/2 rows it moves MORE than standard attention
    assert flash_attention_io(N, d, block_m=16, block_n=16, order="fa2").total > std


def test_fa1_paper_gpt2_comparison_is_reproduced_within_the_model():
    paper = iomodel.fa1_paper_comparison()
    # the standard passes the model counts: the baseline's forward and backward kernels
    assert [p.name for p in paper.standard_forward] == [
        "S = τQKᵀ", "S = S + mask", "P = softmax(S)", "P_drop = dropout(P)", "O = P_drop V"]
    assert [p.name for p in paper.standard_backward] == [
        "dV = P_dropᵀ dO", "dP_drop = dO Vᵀ", "dP = dropout backward", "dS = P ∘ (dP − rowsum(dP ∘ P))",
        "dQ = τ dS K", "dK = τ dSᵀ Q"]
    assert paper.standard / 1e9 == pytest.approx(40.3, rel=0.02)  # the measured 40.3 GB
    assert 7 <= paper.ratio <= 12, f"modelled {paper.ratio:.1f}× against the measured {paper.measured_ratio:.1f}×"
    # the measured 9.2× lies between the model without and with causal tile skipping
    skipping = iomodel.fa1_paper_comparison(causal_skip=True)
    assert paper.ratio < paper.measured_ratio < skipping.ratio


def test_causal_skips_about_half_and_ragged_n():
    for order, backward in itertools.product(iomodel.ORDERS, (False, True)):
        kw = dict(block_m=64, block_n=64, order=order, backward=backward)
        full, causal = flash_attention_io(1000, 64, **kw), flash_attention_io(1000, 64, causal=True, **kw)
        assert 0.45 < causal.total / full.total < 0.7, (order, backward)
    # FA2 writes O (fp16) and L (float32) once
    assert flash_attention_io(1000, 64, block_m=64, block_n=64).writes == 1000 * 64 * 2 + 1000 * 4


def test_block_sizes_follow_each_papers_rule():
    assert block_sizes(iomodel.FA1_PAPER_M, 64) == (64, 256)  # FA1's kernels at d = 64: 256 keys a block
    assert block_sizes(iomodel.FA1_PAPER_M, 64, "fa2") == (256, 64)
    assert block_sizes(4 * 64 * 10, 64) == (10, 10)


def test_errors():
    with pytest.raises(ValueError, match="need M >= 4d"):
        block_sizes(100, 64)
    with pytest.raises(ValueError, match="give the SRAM size M"):
        flash_attention_io(128, 64)
    with pytest.raises(ValueError, match="order must be one of"):
        flash_attention_io(128, 64, block_m=16, block_n=16, order="fa3")
