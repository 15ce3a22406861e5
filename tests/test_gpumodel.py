"""The GPU model of chapters 04 and 09: the H100's rates, the budget of one forward program (against the
tuning notes and the kernels' own configuration list), and the schedule of the key loop."""

import itertools

import pytest

from flashcourse import gpumodel
from flashcourse.gpumodel import H100_SXM, KiB, forward_shared_bytes, kernel_budget, pipeline_schedule, tile_registers


def test_h100_rates_are_the_products_of_per_sm_rates():
    # 132 SMs × 4096 fp16 FLOP/clock and × 16 exp/clock, at 1.83 GHz (the FlashAttention-3 paper's numbers)
    h = H100_SXM
    assert h.matmul_tflops == pytest.approx(132 * 4096 * 1.83e9 / 1e12, rel=0.01)
    assert h.exp_tops == pytest.approx(132 * 16 * 1.83e9 / 1e12, rel=0.01)
    assert h.matmul_tflops / h.bandwidth_tbs == pytest.approx(295, abs=1)  # the ridge chapter 09 quotes
    assert h.shared_per_program == 232448  # 227 KiB, the per-block limit CUDA reports on an H100


def test_exponentials_take_half_the_matmul_time_at_d_128():
    # FA3: "512x more matmul FLOPs than exponential, but exponential has 256x lower throughput"
    assert gpumodel.exp_to_matmul_time(128) == pytest.approx(0.50, abs=0.01)
    assert gpumodel.exp_to_matmul_time(64) == pytest.approx(0.99, abs=0.01)
    assert gpumodel.exp_to_matmul_time(64) == pytest.approx(2 * gpumodel.exp_to_matmul_time(128))


def test_budgets_reproduce_the_tuning_notes():
    # benchmarks/NOTES_forward.md: fp32, d = 128, 128 × 64 blocks, 3 stages needed 256 KiB and did not launch
    fp32 = kernel_budget(128, 64, 8, 3, d=128, bytes_per_element=4)
    assert fp32.shared_bytes == 4 * 128 * (128 + 3 * 2 * 64) == 256 * KiB
    assert fp32.by_shared == 0 and fp32.programs_per_sm == 0
    # the 96 KiB shape (128 × 64, 4 warps, 2 stages): two programs share an SM, by shared memory and registers;
    # acc (128 × 128) and S (128 × 64) in fp32 over 128 threads: 192 registers a thread
    two = kernel_budget(128, 64, 4, 2, d=128)
    assert two.shared_bytes == 96 * KiB and two.by_shared == 2
    assert two.registers == 192 and two.by_registers == 2 and two.programs_per_sm == 2
    assert kernel_budget(128, 64, 4, 2, d=128, registers=224).programs_per_sm == 2
    # the same tiles over 8 warps: 96 a thread at the least, but ~130 in practice: 2 × 256 × 130 > 65,536
    eight = kernel_budget(128, 64, 8, 2, d=128)
    assert eight.registers == 96 and eight.programs_per_sm == 2
    assert kernel_budget(128, 64, 8, 2, d=128, registers=130).programs_per_sm == 1
    # 64 × 64, 4 warps, 3 stages: 112 KiB, and still two a SM with the 1 KiB each program leaves the system
    assert kernel_budget(64, 64, 4, 3, d=128).shared_bytes == 112 * KiB
    assert kernel_budget(64, 64, 4, 3, d=128).by_shared == 2
    # O_i and S_ij of 128 × 128 tiles at d = 128: 256 registers a thread with 4 warps (spills), 128 with 8
    assert tile_registers(128, 128, 128, num_warps=4) == 256
    assert kernel_budget(128, 128, 4, 3, d=128).spills
    assert tile_registers(128, 128, 128, num_warps=8) == 128
    assert not kernel_budget(128, 128, 8, 3, d=128).spills
    # threads: 2048 an SM, so at most 16 programs of 4 warps (128 threads each)
    assert kernel_budget(16, 16, 4, 1, d=16).programs_per_sm == 16


def _forward_configs():
    """The forward kernel's listed configurations ({(d, bytes per element): [(B_r, B_c, warps, stages)]})
    and its verdict on whether one fits on chip: fits(d, e, shape) -> bool."""
    from flashcourse.kernels import configs

    return configs.CANDIDATES["forward"], lambda d, e, s: configs.fits("forward", configs.KernelConfig(*s), d, e)


def test_the_kernels_configs_fit_by_the_same_formula():
    listed, fits = _forward_configs()
    for (d, e), shapes in listed.items():
        for B_r, B_c, warps, stages in shapes:
            ours = forward_shared_bytes(B_r, B_c, d, stages, e)
            assert ours <= H100_SXM.shared_per_program, f"listed {(B_r, B_c, warps, stages)} at d={d}, {e} B needs {ours} B"
            assert fits(d, e, (B_r, B_c, warps, stages)), (d, e, B_r, B_c, warps, stages)
    # at the limit the two agree too: fp32, d = 128, 128 × 64 fits with 2 stages (192 KiB), not with 3 (256 KiB)
    assert fits(128, 4, (128, 64, 8, 2)) and kernel_budget(128, 64, 8, 2, d=128, bytes_per_element=4).by_shared
    assert not fits(128, 4, (128, 64, 8, 3)) and not kernel_budget(128, 64, 8, 3, d=128, bytes_per_element=4).by_shared


def _end(events):
    return max(e.end for e in events)


def test_pipeline_schedule_closed_forms():
    n, L, M, E = 5, 0.6, 1.0, 0.5
    # one buffer: nothing overlaps
    assert _end(pipeline_schedule(n, L, M, E, stages=1)) == pytest.approx(n * (L + M + E))
    # loads ahead: only the first load is exposed when a load is shorter than a block's compute
    assert _end(pipeline_schedule(n, L, M, E, stages=3)) == pytest.approx(L + n * (M + E))
    # softmax under the next QKᵀ: the tensor cores bound it, and it beats plain pipelining
    overlapped = _end(pipeline_schedule(n, L, M, E, stages=3, overlap_softmax=True))
    assert L + n * M <= overlapped < L + n * (M + E) - (n - 2) * E
    # two warpgroups in ping-pong with exp <= matmul / 2: the tensor cores never wait after the first load
    assert _end(pipeline_schedule(n, L, M, E, stages=3, warpgroups=2)) == pytest.approx(L + n * M)
    # chapter 04's old timeline: per warpgroup QKᵀ, exp, PV of 1 unit each, 2 blocks: 12 units of work
    # done in 0.5 + 8 (the tensor cores' 8 units) instead of 0.5 + 12
    assert _end(pipeline_schedule(2, 0.5, 4.0, 2.0, stages=2, warpgroups=2)) == pytest.approx(0.5 + 8)
    with pytest.raises(ValueError, match="stages >= 2"):
        pipeline_schedule(n, L, M, E, stages=1, overlap_softmax=True)


@pytest.mark.parametrize("stages, overlap_softmax, warpgroups",
                         [(1, False, 1), (2, False, 1), (3, True, 1), (3, False, 2), (2, True, 2)])
def test_pipeline_schedule_keeps_every_dependency(stages, overlap_softmax, warpgroups):
    n, L, M, E = 6, 0.7, 1.0, 0.8
    events = pipeline_schedule(n, L, M, E, stages=stages, overlap_softmax=overlap_softmax, warpgroups=warpgroups)
    assert len(events) == n * (1 + 3 * warpgroups)
    for unit in gpumodel.UNITS:  # a unit does one thing at a time
        spans = sorted((e.start, e.end) for e in events if e.unit == unit)
        assert all(a_end <= b_start + 1e-12 for (_, a_end), (b_start, _) in zip(spans, spans[1:])), unit
    at = {(e.op, e.block, e.warpgroup): e for e in events}
    for j, w in itertools.product(range(n), range(warpgroups)):
        load, qk, ex, pv = at["K_j, V_j", j, 0], at["QKᵀ", j, w], at["exp", j, w], at["PV", j, w]
        assert load.end <= qk.start and qk.end <= ex.start and ex.end <= pv.start
        if j >= stages:  # a buffer is reloaded only once every warpgroup is done with it
            assert all(at["PV", j - stages, v].end <= load.start for v in range(warpgroups))
        # the work of a warpgroup is its share of the tile's
        assert qk.end - qk.start == pytest.approx(M / 2 / warpgroups) and ex.end - ex.start == pytest.approx(E / warpgroups)
    tensor = sum(e.end - e.start for e in events if e.unit == "tensor cores")
    assert tensor == pytest.approx(n * M) and _end(events) >= L + n * M


def test_the_schedules_chapter_09_quotes():
    # 6 key blocks, d = 128 (exp ≈ 0.5 of a tile's matmuls), a load 0.6: (time, share the tensor cores are busy)
    exp = gpumodel.exp_to_matmul_time(128)
    quoted = [(dict(stages=1), 12.6, 0.48), (dict(stages=3), 9.6, 0.63),
              (dict(stages=3, overlap_softmax=True), 6.7, 0.90), (dict(stages=3, warpgroups=2), 6.6, 0.91)]
    for options, total, busy in quoted:
        events = pipeline_schedule(6, 0.6, 1.0, exp, **options)
        tensor = sum(e.end - e.start for e in events if e.unit == "tensor cores")
        assert (round(_end(events), 1), round(tensor / _end(events), 2)) == (total, busy), options
