"""The helpers of chapters 05–10 in ``flashcourse.viz``: chapter 09's figures of recorded speed and
chapter 10's gradient-checkpointing measurement. (Chapter 09's GPU model: tests/test_gpumodel.py.)"""

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
