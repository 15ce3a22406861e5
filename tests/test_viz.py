"""The notebooks' helpers: memory measurements, the tile schedule, the online-softmax trace, figures and widgets."""

from unittest import mock

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import flashcourse as fc  # noqa: E402
from flashcourse import iomodel, viz  # noqa: E402
from flashcourse._checks import causal_mask  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_peak_memory_sees_the_n_squared_matrices():
    N = 256
    q = torch.randn(1, 1, N, 32)
    out, naive = viz.peak_memory(fc.naive_attention, q, q, q)
    assert out.shape == q.shape
    # S and P (N² float32 each) are alive together at some point; nothing like 10 of them
    assert 2 * 4 * N * N <= naive <= 10 * 4 * N * N
    _, tiled = viz.peak_memory(fc.tiled_attention, q, q, q, block_m=32, block_n=32)
    assert tiled < naive / 4


def test_saved_for_backward_counts_what_autograd_keeps():
    B, H, N, d = 1, 2, 64, 16
    q, k, v = (torch.randn(B, H, N, d, requires_grad=True) for _ in range(3))
    _, tiled = viz.saved_for_backward(fc.tiled_attention, q, k, v)
    # the inputs are not counted; O (B, H, N, d) and L (B, H, N) are, in float32
    assert tiled == 4 * B * H * N * (d + 1)
    _, naive = viz.saved_for_backward(fc.naive_attention, q, k, v)
    assert naive >= 4 * B * H * N * N


@pytest.mark.parametrize("Nq, Nk, bm, bn, causal, window", [
    (40, 40, 16, 16, True, None), (17, 50, 8, 16, True, None), (50, 17, 16, 8, True, None),
    (33, 33, 8, 8, False, None), (64, 64, 16, 8, True, 20), (30, 70, 8, 8, True, 5),
])
def test_tile_schedule_matches_the_mask(Nq, Nk, bm, bn, causal, window):
    visible = causal_mask(Nq, Nk) if causal else torch.ones(Nq, Nk, dtype=torch.bool)
    if window is not None:
        i, j = torch.arange(Nq)[:, None], torch.arange(Nk)[None, :]
        visible &= j > i + Nk - Nq - window
    tiles = viz.tile_schedule(Nq, Nk, bm, bn, causal, window)
    covered = torch.zeros(Nq, Nk, dtype=torch.int64)
    for t in tiles:
        block = visible[t.i0 : t.i0 + t.rows, t.j0 : t.j0 + t.cols]
        covered[t.i0 : t.i0 + t.rows, t.j0 : t.j0 + t.cols] += 1
        expected = "skipped" if not block.any() else ("full" if block.all() else "masked")
        assert t.kind == expected, t
    assert (covered == 1).all(), "tiles must cover the score matrix exactly once"


def test_causal_skipping_agrees_with_the_tiled_loop():
    # the tiles the figure draws as computed are those tiled.py visits: count its score tiles
    from flashcourse import tiled

    calls = []
    original = tiled._tile_scores
    tiled._tile_scores = lambda *a: calls.append(a[2:4]) or original(*a)
    try:
        q = torch.randn(1, 1, 45, 8)
        k = torch.randn(1, 1, 70, 8)
        tiled.tiled_attention_forward(q, k, k, causal=True, block_m=16, block_n=16)
    finally:
        tiled._tile_scores = original
    drawn = [(t.i0, t.j0) for t in viz.tile_schedule(45, 70, 16, 16, causal=True) if t.kind != "skipped"]
    assert calls == drawn


def test_online_softmax_trace_ends_at_the_exact_output():
    s = torch.randn(37, dtype=torch.float64) * 4
    v = torch.randn(37, 5, dtype=torch.float64)
    trace = viz.online_softmax_trace(s, v, block=8)
    assert [t.end for t in trace] == [0, 8, 16, 24, 32, 37]
    ms = torch.stack([t.state.m for t in trace[1:]])
    assert (ms[1:] >= ms[:-1]).all(), "the running max never decreases"
    torch.testing.assert_close(trace[-1].output, torch.softmax(s, -1) @ v)
    torch.testing.assert_close(trace[-1].state.l, torch.exp(s - s.max()).sum())


def _labelled(fig):
    for ax in fig.axes:
        if ax.get_images() or ax.lines or ax.patches:
            # a twin axis (a second y scale) shares the x label of its sibling; panels side by side, the y label
            xlabel = any(a.get_xlabel() for a in ax.get_shared_x_axes().get_siblings(ax))
            ylabel = any(a.get_ylabel() for a in ax.get_shared_y_axes().get_siblings(ax))
            assert xlabel and ylabel, f"unlabelled axes in {ax.get_title()!r}"
    return True


def test_figures_have_labelled_axes():
    s, v = torch.randn(24, dtype=torch.float64), torch.randn(24, 4, dtype=torch.float64)
    figs = [
        viz.plot_online_step(s, v, block=8, step=2),
        viz.plot_tiles(40, 56, 16, 16, causal=True, step=3),
        viz.plot_tiles(64, 64, 16, 16, causal=True, window=20),
        viz.plot_io([256, 512, 1024], d=64, M=25600, N_fixed=1024),
        viz.plot_paper_comparison(iomodel.fa1_paper_comparison()),
        viz.plot_by_hand(torch.randn(4, 2), torch.randn(4, 2), torch.randn(4, 2), block_n=2),
        viz.plot_loop_orders(),
        viz.plot_kernel_budget([(64, 2, 128, 64, 4, 3), (128, 4, 128, 64, 8, 3)]),
        viz.plot_pipeline(4, load=0.6, matmul=1.0, exp=0.5),
        viz.plot_merge_trees(torch.randn(40, dtype=torch.float64), torch.randn(40, 3, dtype=torch.float64), [5, 20, 30]),
        viz.plot_matrices({"S": torch.randn(5, 7), "P": torch.softmax(torch.randn(5, 7), -1)}),
        viz.plot_memory_scaling([128, 256, 512], {"naive": [1e5, 4e5, 1.6e6]}, limits={"GPU": 1e9}, extrapolate_to=2**16),
        viz.plot_roofline(989.0, 3.35, {"softmax": (1.25, None), "measured": (512.0, 400.0)}),
    ]
    assert all(_labelled(f) for f in figs)


def test_widgets_build_without_a_browser(monkeypatch):
    monkeypatch.setattr(viz, "widgets_live", lambda: True)  # as inside a Jupyter kernel
    s, v = torch.randn(20, dtype=torch.float64), torch.randn(20, 3, dtype=torch.float64)
    box = viz.online_softmax_stepper(s, v, block=8)
    slider, image = box.children
    assert (slider.min, slider.max, slider.value) == (0, 3, 3)
    before = image.value
    slider.value = 1  # redraws the picture
    assert bytes(image.value).startswith(b"\x89PNG") and bytes(image.value) != bytes(before)
    walker = viz.tile_walker(32, 32, 16, 16, causal=True)
    assert walker.children[0].max == 2  # three tiles computed, one skipped
    assert not plt.get_fignums(), "the widgets' figures are closed once rendered"


def test_widgets_show_their_static_figure_without_a_front_end(monkeypatch):
    import matplotlib.figure

    assert not viz.widgets_live(), "outside a Jupyter kernel there is nothing to drive a slider"
    # a stand-in for a Jupyter kernel's shell (matplotlib may call into it too: any attribute answers)
    shell = mock.MagicMock(kernel=object())
    monkeypatch.setattr("IPython.get_ipython", lambda: shell)
    assert viz.widgets_live()
    monkeypatch.setenv("FLASHCOURSE_STATIC_WIDGETS", "1")  # what the notebook tests set
    assert not viz.widgets_live()
    shown = []
    monkeypatch.setattr("IPython.display.display", shown.append)
    assert viz.tile_walker(32, 32, 16, 16, causal=True) is None
    assert len(shown) == 1 and isinstance(shown[0], matplotlib.figure.Figure)


def test_show_error_marks_wrong_and_nan(capsys):
    viz.show_error("same", torch.ones(3), torch.ones(3))
    viz.show_error("off", torch.ones(3) * 2, torch.ones(3))
    viz.show_error("nan", torch.tensor([float("nan")]), torch.ones(1))
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("✓ same") and out[1].startswith("✗ off") and out[2].startswith("✗ nan")
    assert "inf" in out[2]


def test_show_source_prints_a_marked_range_or_everything(capsys):
    viz.show_source(viz.show_error, start="got, want =", stop="print(")
    part = capsys.readouterr().out
    assert part.lstrip().startswith("got, want =") and "print(" not in part
    viz.show_source(viz.show_error, start="no such marker", stop="print(")
    assert capsys.readouterr().out.startswith("def show_error")


def test_gpu_figures_show_the_models_numbers():
    # chapter 04's budget figure: the fp32 shape of the tuning notes is marked as not launching
    fig = viz.plot_kernel_budget([(128, 2, 128, 64, 4, 2), (128, 4, 128, 64, 8, 3)])
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts == ["96 KiB: 2 / SM", "256 KiB: ✗ does not launch"]
    assert [t.get_text() for t in fig.axes[1].texts] == ["≥ 192: ≤ 2 / SM", "≥ 96: ≤ 2 / SM"]
    # chapter 09's pipeline figure: each panel's total is the schedule's
    fig = viz.plot_pipeline(5, load=0.6, matmul=1.0, exp=0.5)
    totals = [float(ax.get_title(loc="left").split(": ")[-1].split(" time")[0]) for ax in fig.axes]
    assert totals == [pytest.approx(x, abs=0.05) for x in (5 * 2.1, 0.6 + 5 * 1.5, totals[2], 0.6 + 5 * 1.0)]
    assert 0.6 + 5 <= totals[2] < 0.6 + 5 * 1.5
