"""The helpers of chapters 05–10 in ``flashcourse.viz``: the GPU budget and pipeline models of chapter 09,
its figures of recorded speed, and chapter 10's gradient-checkpointing measurement."""

import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from flashcourse import viz  # noqa: E402
from flashcourse.gpt import GPTConfig  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_h100_rates_are_the_products_of_per_sm_rates():
    # 132 SMs × 4096 fp16 FLOP/clock and × 16 exp/clock, at 1.83 GHz (the FlashAttention-3 paper's numbers)
    h = viz.H100_SXM
    assert h.matmul_tflops == pytest.approx(132 * 4096 * 1.83e9 / 1e12, rel=0.01)
    assert h.exp_tops == pytest.approx(132 * 16 * 1.83e9 / 1e12, rel=0.01)
    assert h.matmul_tflops / h.bandwidth_tbs == pytest.approx(295, abs=1)  # the ridge chapter 09 quotes


def test_exponentials_take_half_the_matmul_time_at_d_128():
    # FA3: "512x more matmul FLOPs than exponential, but exponential has 256x lower throughput"
    assert viz.exp_to_matmul_time(128) == pytest.approx(0.5, abs=0.01)
    assert viz.exp_to_matmul_time(64) == pytest.approx(2 * viz.exp_to_matmul_time(128))


def test_kernel_budget_reproduces_the_tuning_notes():
    # benchmarks/NOTES_forward.md: the fp32 d = 128 configuration that needed 256 KB and did not launch ...
    fp32 = viz.kernel_budget(128, 64, 8, 3, d=128, element_size=4)
    assert fp32.shared_bytes == 4 * 128 * (128 + 3 * 2 * 64) == 256 * 1024
    assert fp32.programs_by_shared == 0
    # ... and the 96 KB shape (128 × 64, 4 warps, 2 stages) of which two programs share an SM
    two = viz.kernel_budget(128, 64, 4, 2, d=128)
    assert two.shared_bytes == 96 * 1024 and two.programs_by_shared == 2
    # acc (128 × 128) and S (128 × 64) in fp32 over 128 threads: 192 registers a thread
    assert two.tile_registers == 192 and two.programs_by_registers == 2
    # the same tiles over 8 warps: 96 a thread at the least; ~130 in practice cannot give two programs
    eight = viz.kernel_budget(128, 64, 8, 2, d=128)
    assert eight.tile_registers == 96 and 65536 // (130 * 256) == 1


def _end(events):
    return max(e.end for e in events)


def test_pipeline_schedule_closed_forms():
    n, L, M, E = 5, 0.6, 1.0, 0.5
    # one buffer: nothing overlaps
    assert _end(viz.pipeline_schedule(n, L, M, E, stages=1)) == pytest.approx(n * (L + M + E))
    # loads ahead: only the first load is exposed when a load is shorter than a block's compute
    assert _end(viz.pipeline_schedule(n, L, M, E, stages=3)) == pytest.approx(L + n * (M + E))
    # softmax under the next QKᵀ: the tensor cores bound it, and it beats plain pipelining
    overlapped = _end(viz.pipeline_schedule(n, L, M, E, stages=3, overlap_softmax=True))
    assert L + n * M <= overlapped < L + n * (M + E) - (n - 2) * E
    events = viz.pipeline_schedule(n, L, M, E, stages=3, overlap_softmax=True)
    for lane in ("load", "tensor cores", "exp unit"):  # a unit does one thing at a time
        spans = sorted((e.start, e.end) for e in events if e.lane == lane)
        assert all(a_end <= b_start + 1e-12 for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
    with pytest.raises(ValueError, match="stages >= 2"):
        viz.pipeline_schedule(n, L, M, E, stages=1, overlap_softmax=True)


def test_speed_figures_draw_from_json_rows():
    rows = [dict(provider=p, mode=m, dtype="float16", d=128, causal=c, N=N, tflops=t * N / 1024, status="ok")
            for p, t in (("flashcourse", 400), ("sdpa-flash", 300)) for m in ("fwd", "bwd")
            for c in (False, True) for N in (1024, 4096)]
    fig = viz.plot_tflops(rows, dtype="float16", d=128, title="test")
    assert len(fig.axes) == 4 and all(len(ax.lines) == 2 for ax in fig.axes)
    ratios = [dict(mode=m, dtype="float16", d=128, causal=False, N=N, **{"sdpa-flash": 1.3, "sdpa-cudnn": None})
              for m in ("fwd", "bwd") for N in (1024, 4096)]
    fig = viz.plot_speed_ratios(ratios)
    image = fig.axes[0].images[0].get_array()
    assert image.shape == (2, 2) and float(image.max()) == pytest.approx(1.3)
    assert math.isnan(float(fig.axes[1].images[0].get_array().filled(math.nan)[0, 0]))


def test_checkpointing_keeps_less_and_gives_the_same_gradients():
    config = GPTConfig(n_layer=4, n_head=2, n_embd=32, copy_len=32, batch_size=4)
    plain = viz.gpt_training_step(config, "naive")
    ckpt = viz.gpt_training_step(config, "naive", checkpoint=True)
    loss_plain, peak_plain = viz.peak_memory(plain)
    loss_ckpt, peak_ckpt = viz.peak_memory(ckpt)
    assert torch.equal(loss_plain, loss_ckpt)
    for (name, a), b in zip(plain.model.named_parameters(), ckpt.model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=1e-6, msg=name)
    # four blocks: the checkpointed step keeps their inputs and one block's activations at a time
    assert peak_ckpt < 0.6 * peak_plain
    # the step does not update the weights: calling it again gives the same loss
    assert torch.equal(plain(), loss_plain)
    fig = viz.plot_checkpointing({"a": (peak_plain, 2.0), "b": (peak_ckpt, 3.0)})
    assert len(fig.axes) == 2
