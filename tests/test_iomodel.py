"""The IO model's walked counts against its closed forms (chapter 03)."""

import pytest

from flashcourse.iomodel import (block_sizes, flash_attention_io, flash_closed_form, standard_attention_io,
                                 standard_closed_form)


@pytest.mark.parametrize("N", [256, 1024, 4096])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("M", [16 * 1024, 48 * 1024])
def test_walk_matches_closed_forms(N, d, M):
    assert standard_attention_io(N, d).total == standard_closed_form(N, d)
    B_r, B_c = block_sizes(M, d)
    if N % B_r == 0:
        assert flash_attention_io(N, d, M).total == flash_closed_form(N, d, M)


def test_flash_grows_as_n_squared_d_squared_over_m():
    # with B_r <= d, K and V are read N / B_r times: the traffic falls as 1/M
    N, d = 4096, 64
    small_M, big_M = 4 * d * 16, 4 * d * 64  # B_c = B_r = 16 and 64 (both <= d): traffic ∝ 1/M
    ratio = flash_attention_io(N, d, small_M).total / flash_attention_io(N, d, big_M).total
    assert ratio == pytest.approx(4, rel=0.05)
    # S and P cost standard attention 4·N² elements; B_r = d leaves flash 2·N²·d / B_r = 2·N²
    assert flash_attention_io(N, d, big_M).total == pytest.approx(standard_attention_io(N, d).total / 2, rel=0.02)


def test_causal_skips_about_half_and_ragged_n():
    full, causal = flash_attention_io(1000, 64, block_m=64, block_n=64), flash_attention_io(1000, 64, block_m=64, block_n=64, causal=True)
    assert 0.45 < causal.reads / full.reads < 0.6
    assert full.writes == 1000 * 64 * 2 + 1000 * 4


def test_errors():
    with pytest.raises(ValueError, match="need M >= 4d"):
        block_sizes(100, 64)
    with pytest.raises(ValueError, match="give the SRAM size M"):
        flash_attention_io(128, 64)
