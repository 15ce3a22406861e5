"""Measurements, figures and widgets the notebooks call, so that a notebook only explains and calls.

Every ``plot_*`` function draws one figure with labelled axes and units and returns it. Every
``*_stepper``/``*_walker`` function returns an ipywidgets slider wired to a ``plot_*`` function; it
builds without a browser (the executed notebooks in the test suite build them headless).
"""

import math
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

import matplotlib.pyplot as plt
import torch

from .softmax import SoftmaxState, block_state, empty_state, finalize, merge_states

GiB = 2**30


# ----------------------------------------------------------------------------------------------------
# Measuring memory
# ----------------------------------------------------------------------------------------------------


# The one peak-memory helper lives in flashcourse.bench; the notebooks call it as viz.peak_memory.
from .bench.measure import peak_memory  # noqa: E402,F401


def saved_for_backward(fn: Callable, *args, **kwargs):
    """Run ``fn``; return (its result, bytes of the tensors autograd saved for the backward pass).

    Storages are counted once, and the inputs ``args`` themselves are not counted (the caller holds
    them anyway): what remains is what the forward pass keeps alive only for the backward pass.
    """
    inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
    saved: Dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in inputs:
            saved[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args, **kwargs)
    return out, sum(saved.values())


def show_error(name: str, got: torch.Tensor, want: torch.Tensor, atol: float = 1e-5) -> None:
    """Print one line: ✓ (within ``atol``) or ✗, the name, and the largest absolute difference.

    NaN anywhere in ``got`` counts as an infinite error.
    """
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    err = float("inf") if torch.isnan(got).any() else (got - want).abs().nan_to_num(0.0).max().item()
    print(f"{'✓' if err <= atol else '✗'} {name}: max |error| = {err:.3g}")


def show_source(fn, start: Optional[str] = None, stop: Optional[str] = None) -> None:
    """Print the source of a function or ``@triton.jit`` kernel, from the line containing ``start`` up
    to (not including) the line containing ``stop``; the whole source if either marker is not found."""
    import inspect

    lines = inspect.getsource(getattr(fn, "fn", fn)).splitlines()
    first = next((i for i, line in enumerate(lines) if start and start in line), None)
    last = next((i for i, line in enumerate(lines) if stop and stop in line and i > (first or 0)), None)
    if start is not None and stop is not None and first is not None and last is not None:
        lines = lines[first:last]
    print("\n".join(lines))


def _style(ax, xlabel: str, ylabel: str, title: Optional[str] = None):
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)


def plot_matrices(mats: Dict[str, torch.Tensor], *, xlabel="key index j", ylabel="query index i", cmap="viridis"):
    """Heat maps of (N, M) matrices side by side, e.g. the scores S and the probabilities P of one head."""
    fig, axes = plt.subplots(1, len(mats), figsize=(4.2 * len(mats), 3.6), squeeze=False)
    for ax, (title, m) in zip(axes[0], mats.items()):
        m = m.detach().double().cpu()
        im = ax.imshow(m.masked_fill(torch.isinf(m), float("nan")).numpy(), cmap=cmap, aspect="auto")
        fig.colorbar(im, ax=ax, shrink=0.8)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    fig.tight_layout()
    return fig


def plot_memory_scaling(Ns: Sequence[int], measured: Dict[str, Sequence[float]], *, scale: float = 1.0,
                        scale_label: str = "", limits: Optional[Dict[str, float]] = None, extrapolate_to: int = 0):
    """Peak memory (GiB) against N on log-log axes, each curve fitted as c·N^p and extrapolated.

    ``measured`` maps a label to bytes for one (batch, head); ``scale`` multiplies them (e.g. B·H of a
    real model, named by ``scale_label``); ``limits`` maps a GPU name to its memory in bytes and draws
    where each curve crosses it.
    """
    fig, ax = plt.subplots(figsize=(7, 4.5))
    N_max = max(extrapolate_to, max(Ns))
    grid = torch.logspace(math.log10(min(Ns)), math.log10(N_max), 100, dtype=torch.float64)
    logN = torch.tensor(Ns, dtype=torch.float64).log()
    for label, ys in measured.items():
        y = torch.tensor(ys, dtype=torch.float64) * scale
        # fit log y = p log N + log c on the largest three sizes (small N is dominated by fixed costs)
        p, logc = torch.linalg.lstsq(torch.stack([logN[-3:], torch.ones(3, dtype=torch.float64)], 1),
                                     y[-3:].log()[:, None]).solution[:, 0]
        fit = (logc + p * grid.log()).exp()
        line = ax.plot(Ns, (y / GiB).tolist(), "o", label=f"{label}: measured")[0]
        ax.plot(grid.tolist(), (fit / GiB).tolist(), "--", color=line.get_color(), label=f"{label}: fit ∝ N^{p:.2f}")
        for name, cap in (limits or {}).items():
            N_out = float(((math.log(cap) - logc) / p).exp())
            if N_out <= N_max:
                ax.plot([N_out], [cap / GiB], "x", color=line.get_color(), markersize=10, mew=2)
                ax.annotate(f"N ≈ {N_out:,.0f}", (N_out, cap / GiB), textcoords="offset points", xytext=(5, -14),
                            color=line.get_color(), fontsize=8)
    for name, cap in (limits or {}).items():
        ax.axhline(cap / GiB, color="gray", linestyle=":")
        ax.text(grid[0].item(), cap / GiB * 1.15, name, color="gray", fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    _style(ax, "sequence length N (tokens)", f"peak memory (GiB){scale_label}", "Attention memory against sequence length")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------------
# Chapter 02: the online softmax, step by step
# ----------------------------------------------------------------------------------------------------


class OnlineStep(NamedTuple):
    """The running state after ``end`` scores have been read, and the output it would give now."""

    end: int
    state: SoftmaxState
    output: torch.Tensor


def online_softmax_trace(s: torch.Tensor, v: torch.Tensor, block: int) -> List[OnlineStep]:
    """Walk one score row s (N,) and its values v (N, d) in blocks; the state after every block.

    Step 0 is the empty state; step t has merged blocks 0..t−1 with ``merge_states``.
    """
    state = empty_state((), d=v.shape[-1], dtype=s.dtype, device=s.device)
    steps = [OnlineStep(0, state, torch.zeros_like(v[0]))]
    for start in range(0, s.shape[-1], block):
        state = merge_states(state, block_state(s[None, start : start + block], v[start : start + block]))
        state = SoftmaxState(state.m.reshape(()), state.l.reshape(()), state.o.reshape(-1))
        steps.append(OnlineStep(min(start + block, s.shape[-1]), state, finalize(state)[0]))
    return steps


def plot_online_step(s: torch.Tensor, v: torch.Tensor, block: int, step: int):
    """Three panels for one step of the online softmax over the row s (N,) with values v (N, d)."""
    trace = online_softmax_trace(s, v, block)
    step = max(0, min(step, len(trace) - 1))
    cur = trace[step]
    exact = torch.softmax(s.double(), -1).to(v.dtype) @ v
    fig, (a0, a1, a2) = plt.subplots(1, 3, figsize=(14, 3.6))
    idx = torch.arange(s.shape[-1])
    seen = idx < cur.end
    a0.bar(idx[seen].tolist(), s[seen].tolist(), color="tab:blue", label="read")
    a0.bar(idx[~seen].tolist(), s[~seen].tolist(), color="lightgray", label="not read yet")
    for b in range(block, s.shape[-1], block):
        a0.axvline(b - 0.5, color="k", lw=0.5, alpha=0.4)
    if step > 0:
        a0.axhline(cur.state.m.item(), color="tab:red", ls="--", label=f"running max m = {cur.state.m.item():.2f}")
    _style(a0, "key index j", "score s_j (logit, unitless)", f"after block {step} of {len(trace) - 1}")
    a0.legend(fontsize=8, loc="lower left")

    ends = [t.end for t in trace[1:]]
    ms = [t.state.m.item() for t in trace[1:]]
    ls = [t.state.l.item() for t in trace[1:]]
    a1.plot(ends, ms, "o-", color="tab:red", label="m (running max)")
    a1b = a1.twinx()
    a1b.plot(ends, ls, "s-", color="tab:green", label="ℓ (running sum of exp(s − m))")
    if step > 0:
        a1.axvline(cur.end, color="k", alpha=0.3)
    _style(a1, "keys read so far", "m (logit)", "the running statistics")
    a1b.set_ylabel("ℓ (sum of weights, unitless)")
    a1.legend(loc="upper left", fontsize=8)
    a1b.legend(loc="lower right", fontsize=8)

    d = min(v.shape[-1], 8)
    x = torch.arange(d)
    a2.bar((x - 0.2).tolist(), cur.output[:d].tolist(), width=0.4, label="o / ℓ now")
    a2.bar((x + 0.2).tolist(), exact[:d].tolist(), width=0.4, label="softmax(s) v (all keys)")
    err = (cur.output - exact).abs().max().item()
    _style(a2, "output feature", "value (unitless)", f"partial output, max |error| = {err:.2e}")
    a2.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _slider_widget(draw: Callable[[int], object], n_steps: int, description: str, value: int = 0):
    """An IntSlider over 0..n_steps−1 that redraws ``draw(step)`` into an Output below it."""
    import ipywidgets as widgets

    slider = widgets.IntSlider(value=value, min=0, max=max(n_steps - 1, 0), description=description,
                               continuous_update=False)
    out = widgets.Output()

    def redraw(change=None):
        out.clear_output(wait=True)
        with out:
            fig = draw(slider.value)
            plt.show()
            plt.close(fig)

    slider.observe(redraw, names="value")
    redraw()
    return widgets.VBox([slider, out])


def online_softmax_stepper(s: torch.Tensor, v: torch.Tensor, block: int):
    """A slider that walks the blocks of the online softmax (chapter 02) and redraws m, ℓ and o / ℓ."""
    n_steps = math.ceil(s.shape[-1] / block) + 1
    return _slider_widget(lambda t: plot_online_step(s, v, block, t), n_steps, "block", value=n_steps - 1)


# ----------------------------------------------------------------------------------------------------
# Chapter 03: tiles, and the bytes they move
# ----------------------------------------------------------------------------------------------------


class Tile(NamedTuple):
    """One (query block, key block) pair of the tiled loops and what the forward pass does with it."""

    i0: int
    j0: int
    rows: int
    cols: int
    kind: str  # "full" (no mask), "masked" (crosses a mask edge), "skipped" (entirely masked)


def tile_schedule(Nq: int, Nk: int, block_m: int, block_n: int, causal: bool = False,
                  window: Optional[int] = None) -> List[Tile]:
    """Every tile of an Nq × Nk score matrix in the forward loop order (query blocks outer).

    Query i sees key j when j <= i + Nk − Nq (if ``causal``) and j > i + Nk − Nq − ``window`` (a sliding
    window of that many keys ending at the diagonal). A tile that no query of it can see is skipped.
    """
    offset = Nk - Nq
    # the visible keys of row i are lo(i) .. hi(i)
    hi = (lambda i: i + offset) if causal else (lambda i: Nk - 1)
    lo = (lambda i: i + offset - window + 1) if window is not None else (lambda i: 0)
    tiles = []
    for i0 in range(0, Nq, block_m):
        rows = min(block_m, Nq - i0)
        first, last = i0, i0 + rows - 1
        for j0 in range(0, Nk, block_n):
            cols = min(block_n, Nk - j0)
            if j0 > hi(last) or j0 + cols - 1 < lo(first):
                kind = "skipped"
            elif j0 + cols - 1 > hi(first) or j0 < lo(last):
                kind = "masked"
            else:
                kind = "full"
            tiles.append(Tile(i0, j0, rows, cols, kind))
    return tiles


TILE_COLORS = {"full": "tab:blue", "masked": "tab:orange", "skipped": "whitesmoke"}


def plot_tiles(Nq: int, Nk: int, block_m: int, block_n: int, causal: bool = False, step: Optional[int] = None,
               window: Optional[int] = None):
    """The score matrix cut into B_r × B_c tiles: computed, masked on the diagonal, or skipped.

    With ``step``, the tiles computed so far are drawn solid, the current one outlined in red, and the
    on-chip working set of that step (Q_i, K_j, V_j, the S_ij tile) is listed in the title.
    """
    from matplotlib.patches import Rectangle

    tiles = tile_schedule(Nq, Nk, block_m, block_n, causal, window)
    computed = [t for t in tiles if t.kind != "skipped"]
    fig, ax = plt.subplots(figsize=(7.5, 5.0 * min(2.0, max(0.5, Nq / Nk))))
    current = computed[min(step, len(computed) - 1)] if step is not None and computed else None
    done = set(computed[: computed.index(current) + 1]) if current else set(computed)
    for t in tiles:
        alpha = 0.9 if (t in done or t.kind == "skipped") else 0.25
        ax.add_patch(Rectangle((t.j0, t.i0), t.cols, t.rows, facecolor=TILE_COLORS[t.kind], edgecolor="k",
                               lw=0.6, alpha=alpha))
    # the edges of the visible region: row i sees columns i + Nk − Nq − window + 1 .. i + Nk − Nq
    edges = ([1] if causal else []) + ([1 - window] if window is not None else [])
    for shift in edges:
        xs = [min(max(i + Nk - Nq + shift, 0), Nk) for i in range(Nq) for _ in (0, 1)]
        ys = [i + e for i in range(Nq) for e in (0, 1)]
        ax.plot(xs, ys, color="tab:red", lw=1.2)
    if current:
        ax.add_patch(Rectangle((current.j0, current.i0), current.cols, current.rows, fill=False, edgecolor="red", lw=2.5))
    ax.set_xlim(0, Nk)
    ax.set_ylim(Nq, 0)
    ax.set_aspect("equal")
    n_skip = sum(t.kind == "skipped" for t in tiles)
    title = f"{len(computed)} tiles computed, {n_skip} skipped (B_r={block_m}, B_c={block_n})"
    if current:
        title = (f"step {computed.index(current)}: Q_i rows {current.i0}–{current.i0 + current.rows - 1}, "
                 f"K_j,V_j rows {current.j0}–{current.j0 + current.cols - 1}\n({current.kind} tile)")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("key index j (tokens)")
    ax.set_ylabel("query index i (tokens)")
    handles = [Rectangle((0, 0), 1, 1, color=c) for c in TILE_COLORS.values()]
    ax.legend(handles, ["computed, no mask", "computed, masked (on a mask edge)", "skipped"], fontsize=8,
              loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    return fig


def tile_walker(Nq: int, Nk: int, block_m: int, block_n: int, causal: bool = False):
    """A slider that walks the tiles of the forward pass in loop order (chapter 03)."""
    n = sum(t.kind != "skipped" for t in tile_schedule(Nq, Nk, block_m, block_n, causal))
    return _slider_widget(lambda t: plot_tiles(Nq, Nk, block_m, block_n, causal, step=t), n, "tile")


def plot_io(Ns: Sequence[int], d: int, M: int, blocks: Sequence[int], *, N_fixed: int = 4096):
    """HBM traffic of standard vs tiled attention: against N (left) and against the block size (right).

    Markers are counts from walking the loops (``flashcourse.iomodel``), lines the closed forms.
    """
    from . import iomodel

    fig, (a0, a1) = plt.subplots(1, 2, figsize=(12, 4.2))
    std = [iomodel.standard_attention_io(N, d).total / 2**20 for N in Ns]
    fl = [iomodel.flash_attention_io(N, d, M).total / 2**20 for N in Ns]
    a0.plot(Ns, std, "o", color="tab:red", label="standard: counted")
    a0.plot(Ns, [iomodel.standard_closed_form(N, d) / 2**20 for N in Ns], "-", color="tab:red",
            label="standard: 2(4Nd + 4N²) bytes")
    a0.plot(Ns, fl, "s", color="tab:blue", label=f"tiled (M = {M:,} elements): counted")
    a0.plot(Ns, [iomodel.flash_closed_form(N, d, M) / 2**20 for N in Ns], "-", color="tab:blue",
            label="tiled: closed form ≈ 2N²d / B_r")
    a0.set_xscale("log")
    a0.set_yscale("log")
    _style(a0, "sequence length N (tokens)", "HBM traffic per head (MiB, fp16)", f"against N (d = {d})")
    a0.legend(fontsize=8)
    per_block = [iomodel.flash_attention_io(N_fixed, d, block_m=b, block_n=b).total / 2**20 for b in blocks]
    a1.plot(blocks, per_block, "s-", color="tab:blue", label="tiled, B_r = B_c = block")
    a1.axhline(iomodel.standard_attention_io(N_fixed, d).total / 2**20, color="tab:red", ls="--", label="standard")
    a1.set_xscale("log", base=2)
    a1.set_yscale("log")
    _style(a1, "block size B_r = B_c (rows)", "HBM traffic per head (MiB, fp16)", f"against block size (N = {N_fixed}, d = {d})")
    a1.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------------
# Chapter 09: the roofline, recorded speed, and the GPU under the kernel
# ----------------------------------------------------------------------------------------------------


class GPUSpec(NamedTuple):
    """The numbers of one GPU that chapter 09 reasons with (per the vendor's spec sheet)."""

    name: str
    sms: int                       # streaming multiprocessors; one program (CTA) runs on one SM
    matmul_tflops: float           # dense fp16/bf16 tensor-core throughput
    exp_tops: float                # special-function unit (exp2, …) throughput, operations/s × 1e-12
    bandwidth_tbs: float           # HBM bandwidth
    registers_per_sm: int          # 32-bit registers shared by the resident programs
    max_registers_per_thread: int
    shared_per_sm: int             # bytes of shared memory shared by the resident programs
    shared_per_program: int        # the most one program may allocate


# H100 SXM5: 132 SMs × 4096 fp16 FLOP/clock × 1.83 GHz ≈ 989 TFLOP/s; 132 SMs × 16 exp/clock × 1.83 GHz
# ≈ 3.9 T exp/s (the FlashAttention-3 paper's numbers); 64 Ki registers and 228 KiB of shared memory per
# SM, of which one program may take 227 KiB.
H100_SXM = GPUSpec("H100 SXM", sms=132, matmul_tflops=989.0, exp_tops=3.9, bandwidth_tbs=3.35,
                   registers_per_sm=65536, max_registers_per_thread=255,
                   shared_per_sm=228 * 1024, shared_per_program=227 * 1024)


def plot_roofline(peak_tflops: float, bandwidth_tbs: float, points: Dict[str, tuple], *, device: str = "GPU"):
    """The roofline: attainable TFLOP/s = min(peak, intensity × bandwidth), against FLOPs per HBM byte.

    ``points`` maps a label to (arithmetic intensity in FLOP/byte, measured TFLOP/s or None); a point
    without a measurement is drawn on the roof, where that intensity would at best take it.
    """
    ridge = peak_tflops / bandwidth_tbs  # FLOP/byte where the two roofs meet
    fig, ax = plt.subplots(figsize=(11, 4.8), layout="constrained")
    lo = min([0.5] + [p[0] / 2 for p in points.values()])
    hi = max([ridge * 20] + [p[0] * 2 for p in points.values()])
    xs = torch.logspace(math.log10(lo), math.log10(hi), 200)
    ax.plot(xs.tolist(), torch.clamp(xs * bandwidth_tbs, max=peak_tflops).tolist(), "k-", lw=2)
    ax.axvline(ridge, color="gray", ls=":")
    bottom = peak_tflops * 1e-3
    ax.text(ridge * 1.1, bottom * 1.5, f"ridge: {ridge:.0f} FLOP/byte", color="gray", fontsize=8, va="bottom")
    ax.text(lo * 1.2, peak_tflops * 1.15, f"compute roof {peak_tflops:.0f} TFLOP/s", fontsize=8, va="bottom")
    x_label = math.sqrt(lo * ridge) / 3   # part-way up the memory roof, under the line
    ax.text(x_label, x_label * bandwidth_tbs / 5, f"memory roof: {bandwidth_tbs:.2f} TB/s × intensity", fontsize=8)
    for i, (label, (intensity, measured)) in enumerate(points.items()):
        roof = min(peak_tflops, intensity * bandwidth_tbs)
        y = roof if measured is None else measured
        ax.plot([intensity], [y], "o" if measured is None else "*", markersize=8 if measured is None else 13,
                color=f"C{i % 10}", label=f"{label}: {intensity:.3g} FLOP/B" + ("" if measured is None else f", {measured:.0f} TFLOP/s"))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(bottom, peak_tflops * 3)
    _style(ax, "arithmetic intensity (FLOPs per byte of HBM traffic)", "attainable throughput (TFLOP/s)",
           f"Roofline of {device}")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def _field(row, key):
    """``row[key]`` of a JSON row, or ``row.key`` of a measurement object."""
    return row[key] if isinstance(row, dict) else getattr(row, key)


def plot_tflops(rows, *, dtype: str = "float16", d: int = 128, title: str = ""):
    """TFLOP/s against N of every provider, for one dtype and head dim: forward and backward, causal or not.

    ``rows``: benchmark measurements (JSON dicts or objects) with provider, mode, dtype, d, causal, N,
    tflops and status. The backward's FLOPs are counted as 2.5 × the forward's (five N²d matmuls).
    """
    panels = [(mode, causal) for mode in ("fwd", "bwd") for causal in (False, True)]
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.8), sharey=True, layout="constrained")
    providers = list(dict.fromkeys(_field(r, "provider") for r in rows))
    ymax = 0.0
    for ax, (mode, causal) in zip(axes, panels):
        for i, provider in enumerate(providers):
            pts = sorted((_field(r, "N"), _field(r, "tflops")) for r in rows
                         if _field(r, "provider") == provider and _field(r, "mode") == mode and _field(r, "dtype") == dtype
                         and _field(r, "d") == d and _field(r, "causal") == causal and _field(r, "status") == "ok")
            if pts:
                ax.plot(*zip(*pts), "o-", color=f"C{i}", label=provider)
                ymax = max(ymax, max(y for _, y in pts))
        ax.set_xscale("log", base=2)
        counted = "4BHN²d" if mode == "fwd" else "2.5 × 4BHN²d"
        _style(ax, "sequence length N (tokens)", "TFLOP/s" if ax is axes[0] else "",
               f"{mode}{', causal' if causal else ''} (FLOPs counted: {counted}{' / 2' if causal else ''})")
        ax.title.set_fontsize(9)
    axes[0].set_ylim(0, ymax * 1.1 or 1)
    legend = {label: h for ax in axes for h, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(legend.values(), legend.keys(), loc="outside lower center", ncol=len(legend), fontsize=9)
    fig.suptitle(f"{title} · {dtype}, d = {d}" if title else f"{dtype}, d = {d}", fontsize=10)
    return fig


def plot_speed_ratios(ratios, baselines: Sequence[str] = ("sdpa-flash", "sdpa-cudnn"), provider: str = "flashcourse"):
    """Heat maps of ``provider``'s TFLOP/s divided by each baseline's, one row per (mode, dtype, d, causal),
    one column per N. ``ratios``: dicts with mode, dtype, d, causal, N and one ratio per baseline name."""
    from matplotlib.colors import TwoSlopeNorm

    rows = [r for r in ratios if r["mode"] in ("fwd", "bwd")]
    # forward rows first, then backward; within each, by dtype, head dim and causal
    keys = sorted({(r["mode"], r["dtype"], r["d"], r["causal"]) for r in rows},
                  key=lambda k: (k[0] != "fwd", k[1] != "float16", k[2], k[3]))
    Ns = sorted({r["N"] for r in rows})
    fig, axes = plt.subplots(1, len(baselines), figsize=(4.2 * len(baselines) + 2, 0.32 * len(keys) + 1.6),
                             layout="constrained", squeeze=False)
    norm = TwoSlopeNorm(vmin=0.5, vcenter=1.0, vmax=1.6)
    for ax, base in zip(axes[0], baselines):
        grid = torch.full((len(keys), len(Ns)), float("nan"))
        for r in rows:
            if r.get(base) is not None:
                grid[keys.index((r["mode"], r["dtype"], r["d"], r["causal"])), Ns.index(r["N"])] = r[base]
        im = ax.imshow(grid.numpy(), cmap="RdBu", norm=norm, aspect="auto")
        for (i, j), x in zip(((i, j) for i in range(len(keys)) for j in range(len(Ns))), grid.flatten().tolist()):
            if not math.isnan(x):
                ax.text(j, i, f"{x:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if abs(x - 1) > 0.35 else "black")
        ax.set_xticks(range(len(Ns)), [f"{n:,}" for n in Ns])
        ax.set_yticks(range(len(keys)), [f"{m} · {dt.replace('float', 'fp').replace('bfp', 'bf')} · d={hd}{' · causal' if c else ''}"
                                          for m, dt, hd, c in keys] if ax is axes[0][0] else [])
        ax.set_xlabel("sequence length N (tokens)")
        ax.set_title(f"{provider} TFLOP/s ÷ {base}", fontsize=10)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="ratio (> 1: faster than the baseline)")
    return fig


class KernelBudget(NamedTuple):
    """What one program of the forward kernel asks of an SM, and how many such programs fit at once."""

    shared_bytes: int           # Q_i + num_stages buffers of K_j and V_j
    tile_registers: int         # per thread, for the fp32 tiles acc_i (B_r × d) and S_ij (B_r × B_c) alone
    programs_by_shared: int     # resident programs the shared memory allows (0: does not launch)
    programs_by_registers: int  # resident programs the register file allows, at that register count


def kernel_budget(block_m: int, block_n: int, num_warps: int, num_stages: int, *, d: int, element_size: int = 2,
                  gpu: GPUSpec = H100_SXM) -> KernelBudget:
    """The shared-memory and register budget of one forward program (B_r = block_m, B_c = block_n).

    The register count is a lower bound: addresses, row statistics and the low-precision copy of P add
    to it, and the compiler may keep more alive (a GPU's compiled kernel reports ``n_regs`` and
    ``n_spills``).
    """
    # shared memory = element size · d · (B_r + num_stages · 2 · B_c)   (Q_i once; K_j, V_j per stage)
    shared = element_size * d * (block_m + num_stages * 2 * block_n)
    threads = 32 * num_warps
    # one 32-bit register per fp32 element of acc_i and S_ij, spread over the program's threads
    registers = math.ceil(block_m * (d + block_n) / threads)
    by_shared = 0 if shared > gpu.shared_per_program else gpu.shared_per_sm // shared
    by_registers = 0 if registers > gpu.max_registers_per_thread else gpu.registers_per_sm // (registers * threads)
    return KernelBudget(shared, registers, by_shared, by_registers)


def plot_kernel_budget(shapes: Sequence[tuple], d: int, element_size: int = 2, gpu: GPUSpec = H100_SXM):
    """Shared memory and tile registers of forward configurations (B_r, B_c, num_warps, num_stages)
    against the limits of ``gpu``, with the programs per SM that each allows."""
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(13, 4.2), layout="constrained")
    budgets = [kernel_budget(*s, d=d, element_size=element_size, gpu=gpu) for s in shapes]
    names = [f"{bm}×{bn}\n{w} warps\n{st} stages" for bm, bn, w, st in shapes]
    x = list(range(len(shapes)))
    a0.bar(x, [b.shared_bytes / 1024 for b in budgets], color="tab:purple")
    a0.axhline(gpu.shared_per_program / 1024, color="tab:red", ls="--", label=f"one program's limit ({gpu.shared_per_program // 1024} KiB)")
    a0.axhline(gpu.shared_per_sm / 2048, color="tab:orange", ls=":", label=f"two programs per SM ({gpu.shared_per_sm // 2048} KiB each)")
    for i, b in enumerate(budgets):
        a0.text(i, b.shared_bytes / 2048, f"{b.shared_bytes / 1024:.0f} KiB\n{b.programs_by_shared} / SM", ha="center",
                va="center", fontsize=8, color="white")
    a0.set_xticks(x, names, fontsize=8)
    _style(a0, "", "shared memory per program (KiB)", f"Q_i + stages·(K_j + V_j), d = {d}, {8 * element_size}-bit")
    a0.set_ylim(0, gpu.shared_per_program / 1024 * 1.25)
    a0.legend(fontsize=8, loc="upper left")
    a1.bar(x, [b.tile_registers for b in budgets], color="tab:cyan")
    a1.axhline(gpu.max_registers_per_thread, color="tab:red", ls="--", label=f"per-thread limit ({gpu.max_registers_per_thread})")
    two = [min(gpu.max_registers_per_thread, gpu.registers_per_sm // (2 * 32 * w)) for _, _, w, _ in shapes]
    a1.plot(x, two, "_", color="tab:orange", markersize=40, mew=3, label="most registers a thread may use for two programs per SM")
    for i, b in enumerate(budgets):
        a1.text(i, b.tile_registers / 2, f"≥ {b.tile_registers}", ha="center", va="center", fontsize=8, color="white")
    a1.set_xticks(x, names, fontsize=8)
    _style(a1, "", "registers per thread (32-bit)", "fp32 tiles acc_i (B_r × d) and S_ij (B_r × B_c) alone")
    a1.set_ylim(0, gpu.max_registers_per_thread * 1.3)
    a1.legend(fontsize=8, loc="upper left", markerscale=0.4)
    fig.suptitle(f"What one forward program asks of an {gpu.name} SM (64 Ki registers, {gpu.shared_per_sm // 1024} KiB shared memory)", fontsize=10)
    return fig


def exp_to_matmul_time(d: int, gpu: GPUSpec = H100_SXM) -> float:
    """Time of the exponentials over time of the matmuls, per score of the forward pass at head dim d.

    Each score S_ij costs 4d matmul FLOPs (2d in Q_i K_jᵀ, 2d in P_ij V_j) and one exp.
    """
    # (1 / exp rate) / (4d / matmul rate)
    return (1 / gpu.exp_tops) / (4 * d / gpu.matmul_tflops)


class Event(NamedTuple):
    """One operation of a pipeline schedule: on which unit, for which key block, when."""

    lane: str   # "load", "tensor cores" or "exp unit"
    op: str     # "K_j, V_j", "QKᵀ", "exp", "PV"
    block: int
    start: float
    end: float


def pipeline_schedule(n_blocks: int, load: float, matmul: float, exp: float, *, stages: int,
                      overlap_softmax: bool = False) -> List[Event]:
    """Schedule one program's key loop on three units that run in parallel: the copy engine, the tensor
    cores and the exp unit. Block j: load K_j, V_j (``load``), S = QKᵀ (``matmul``/2), exp (``exp``),
    PV (``matmul``/2); each unit runs its operations in order.

    ``stages`` buffers for K_j, V_j: the load of block j waits until block j − stages has finished its
    PV (1 buffer: the next load waits for the whole block, nothing overlaps). ``overlap_softmax`` issues
    QKᵀ of block j + 1 before PV of block j (FlashAttention-3), so block j's exponentials run under it.
    """
    if overlap_softmax and stages < 2:
        raise ValueError("overlapping the softmax needs K_{j+1} loaded during block j: stages >= 2")
    events: List[Event] = []
    clock = {"load": 0.0, "tensor cores": 0.0, "exp unit": 0.0}
    loaded: Dict[int, float] = {}
    exp_done: Dict[int, float] = {}

    def run(lane, op, j, ready, duration):
        start = max(ready, clock[lane])
        clock[lane] = start + duration
        events.append(Event(lane, op, j, start, start + duration))
        return start + duration

    def qk_and_exp(j):
        s_done = run("tensor cores", "QKᵀ", j, loaded[j], matmul / 2)
        exp_done[j] = run("exp unit", "exp", j, s_done, exp)

    for j in range(min(stages, n_blocks)):        # the prologue: every buffer filled ahead of the loop
        loaded[j] = run("load", "K_j, V_j", j, 0.0, load)
    for j in range(n_blocks):
        if j not in exp_done:
            qk_and_exp(j)
        if overlap_softmax and j + 1 < n_blocks:
            qk_and_exp(j + 1)                     # QKᵀ of the next block while block j's exp runs
        pv_done = run("tensor cores", "PV", j, exp_done[j], matmul / 2)
        if j + stages < n_blocks:                 # block j's buffer is free: refill it
            loaded[j + stages] = run("load", "K_j, V_j", j + stages, pv_done, load)
    return events


def plot_pipeline(n_blocks: int, load: float, matmul: float, exp: float):
    """Gantt charts of one program's key loop: no pipelining, software pipelining (num_stages = 3), and
    pipelining with the softmax overlapped with the next block's QKᵀ (FlashAttention-3)."""
    cases = [("num_stages = 1: load, then compute", dict(stages=1)),
             ("num_stages = 3: loads run ahead (software pipelining)", dict(stages=3)),
             ("num_stages = 3 and QKᵀ of block j+1 issued before PV of block j (FA3)", dict(stages=3, overlap_softmax=True))]
    colors = {"K_j, V_j": "tab:gray", "QKᵀ": "tab:blue", "exp": "tab:orange", "PV": "tab:green"}
    lanes = ["load", "tensor cores", "exp unit"]
    schedules = [pipeline_schedule(n_blocks, load, matmul, exp, **kw) for _, kw in cases]
    longest = max(max(e.end for e in s) for s in schedules)
    fig, axes = plt.subplots(len(cases), 1, figsize=(12, 2.0 * len(cases) + 0.6), sharex=True, layout="constrained")
    for ax, (title, _), events in zip(axes, cases, schedules):
        for e in events:
            y = lanes.index(e.lane)
            ax.barh(y, e.end - e.start, left=e.start, height=0.7, color=colors[e.op], edgecolor="k", lw=0.5)
            ax.text((e.start + e.end) / 2, y, str(e.block), ha="center", va="center", fontsize=7)
        total = max(e.end for e in events)
        busy = sum(e.end - e.start for e in events if e.lane == "tensor cores")
        ax.set_title(f"{title}: {total:.1f} time units, tensor cores busy {busy / total:.0%}", fontsize=9, loc="left")
        ax.set_yticks(range(len(lanes)), lanes, fontsize=8)
        ax.set_ylim(len(lanes) - 0.4, -0.6)
        ax.grid(True, axis="x", alpha=0.3)
    axes[-1].set_xlim(0, longest * 1.01)
    axes[-1].set_xlabel("time (one unit = QKᵀ + PV of one tile on the tensor cores); the number in a bar is the key block j")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    fig.legend(handles, [f"{op}" for op in colors], loc="outside upper right", ncol=4, fontsize=8)
    return fig


# ----------------------------------------------------------------------------------------------------
# Chapter 10: gradient checkpointing, measured on chapter 08's GPT
# ----------------------------------------------------------------------------------------------------


class _Checkpointed(torch.nn.Module):
    """A module whose activations are not kept: its forward runs again during the backward pass."""

    def __init__(self, block: torch.nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False)


def gpt_training_step(config, backend: str, *, checkpoint: bool = False, device="cpu", seed: int = 0) -> Callable:
    """One forward + backward pass of a fresh ``flashcourse.gpt.GPT`` on one fixed batch of the copy task.

    With ``checkpoint`` every Transformer block is wrapped in ``torch.utils.checkpoint``: the forward
    keeps only each block's input, and the backward recomputes the block. The step does not update the
    weights, so every call does the same work; it returns the loss (``step.model`` is the model).
    """
    import torch.utils.checkpoint  # noqa: F401  (the submodule _Checkpointed calls)

    from .gpt import GPT, copy_batch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT(config, backend).to(device)
    if checkpoint:
        model.blocks = torch.nn.ModuleList(_Checkpointed(b) for b in model.blocks)
    idx, targets = copy_batch(config, torch.Generator().manual_seed(seed), device)

    def step():
        model.zero_grad(set_to_none=True)
        _, loss = model(idx, targets)
        loss.backward()
        return loss.detach()

    step.model = model  # for a look at its gradients
    return step


def plot_checkpointing(measured: Dict[str, tuple], title: str = ""):
    """Bars of peak memory (MiB) and step time (ms) per configuration; ``measured`` maps a label to
    (peak bytes, milliseconds)."""
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(12, 3.8), layout="constrained")
    labels = list(measured)
    colors = [f"C{i}" for i in range(len(labels))]
    y = list(range(len(labels)))
    for ax, values, xlabel in ((a0, [b / 2**20 for b, _ in measured.values()], "peak memory of one training step (MiB)"),
                               (a1, [ms for _, ms in measured.values()], "time of one training step (ms)")):
        ax.barh(y, values, color=colors)
        for i, x in enumerate(values):
            ax.text(x, i, f" {x:.3g}", va="center", fontsize=8)
        ax.set_yticks(y, labels if ax is a0 else [""] * len(labels))
        ax.set_ylim(len(labels) - 0.5, -0.5)
        ax.set_xlim(0, max(values) * 1.2)
        _style(ax, xlabel, "")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


# ----------------------------------------------------------------------------------------------------
# Chapter 11: beyond one GPU
# ----------------------------------------------------------------------------------------------------


def plot_ring_balance(world_size: int = 4, causal: bool = True):
    """Causal work of each rank at each ring step, contiguous against zigzag sharding, and the ring's time.

    Work is in units of (N/P)² query-key pairs (``distributed.step_work``); a step lasts as long as
    its busiest rank, so the ring's time is Σ_s max_r work[r, s].
    """
    from .distributed import step_work

    fig, axes = plt.subplots(1, 3, figsize=(13, 4), gridspec_kw={"width_ratios": [1, 1, 0.8]})
    totals = {}
    for ax, layout in zip(axes, ("contiguous", "zigzag")):
        work = step_work(world_size, layout, causal)
        ax.imshow(work.numpy(), cmap="Blues", vmin=0, vmax=1)
        for r in range(world_size):
            for s in range(world_size):
                ax.text(s, r, f"{work[r, s].item():g}", ha="center", va="center", fontsize=9,
                        color="white" if work[r, s] > 0.6 else "black")
        ax.set_xticks(range(world_size))
        ax.set_yticks(range(world_size))
        totals[layout] = (work.amax(0).sum().item(), work.sum(1).max().item())
        _style(ax, "ring step s", "rank r", f"{layout}: work per step, (N/P)² units")
    ideal = step_work(world_size, "zigzag", causal).sum().item() / world_size
    names = list(totals)
    axes[2].bar(names, [totals[n][0] for n in names], color=["tab:red", "tab:green"])
    axes[2].axhline(ideal, color="k", ls="--", label=f"perfect balance: {ideal:g}")
    for i, n in enumerate(names):
        axes[2].text(i, totals[n][0], f"{totals[n][0]:g}", ha="center", va="bottom")
    _style(axes[2], "layout", "ring time: Σ_s max_r work", f"P = {world_size}, {'causal' if causal else 'full'}")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    return fig


# link name -> bytes per second one way (nominal): what a K/V hop travels over
LINKS = {"NVLink 4 (H100)": 450e9, "PCIe 5 x16": 64e9, "InfiniBand NDR 400G": 50e9, "Ethernet 100G": 12.5e9}


def plot_ring_overlap(*, H: int = 16, Hkv: Optional[int] = None, d: int = 128, flops_per_s: float = 400e12,
                      links: Optional[Dict[str, float]] = None, element_size: int = 2):
    """When does a ring step's compute hide its K/V transfer? Left: both times against the shard
    length n = N/P (causal, balanced). Right: the crossover n against the link's bandwidth."""
    from .distributed import overlap_crossover, ring_step_times

    links = LINKS if links is None else links
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(12, 4.4))
    ns = [2.0**e for e in range(8, 21)]
    compute = [ring_step_times(int(n), H=H, Hkv=Hkv, d=d, flops_per_s=flops_per_s, bytes_per_s=1.0,
                               element_size=element_size)[0] for n in ns]
    a0.plot(ns, [1e3 * t for t in compute], "k-", lw=2, label="compute (causal, balanced)")
    for i, (name, bw) in enumerate(links.items()):
        comm = [ring_step_times(int(n), H=H, Hkv=Hkv, d=d, flops_per_s=flops_per_s, bytes_per_s=bw,
                                element_size=element_size)[1] for n in ns]
        a0.plot(ns, [1e3 * t for t in comm], "--", color=f"C{i}", label=f"K/V transfer, {name}")
    a0.set_xscale("log", base=2)
    a0.set_yscale("log")
    _style(a0, "shard length n = N/P (tokens)", "time per ring step (ms)",
           f"H = {H}, Hkv = {Hkv or H}, d = {d}, {flops_per_s / 1e12:.0f} TFLOP/s")
    a0.legend(fontsize=7)
    bws = [10.0**e for e in torch.linspace(9.5, 12, 60).tolist()]
    for hkv, ls in ((Hkv or H, "-"), (max(1, (Hkv or H) // 8), "--")):
        a1.plot([b / 1e9 for b in bws],
                [overlap_crossover(H=H, Hkv=hkv, flops_per_s=flops_per_s, bytes_per_s=b, element_size=element_size)
                 for b in bws], "k" + ls, label=f"Hkv = {hkv} (H = {H})")
    for i, (name, bw) in enumerate(links.items()):
        n = overlap_crossover(H=H, Hkv=Hkv, flops_per_s=flops_per_s, bytes_per_s=bw, element_size=element_size)
        a1.plot([bw / 1e9], [n], "o", color=f"C{i}", label=f"{name}: n ≥ {n:,.0f}")
    a1.set_xscale("log")
    a1.set_yscale("log")
    _style(a1, "link bandwidth (GB/s, one way)", "shard length n above which overlap hides the transfer",
           "the crossover (the same for every d)")
    a1.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_ring_benchmark(result: dict):
    """The recorded run of ``benchmarks/ring.py`` (its ring.json, loaded): scaling efficiency and
    fwd+bwd time with and without communication, per N and strategy."""
    sizes = [r for r in result["sizes"] if r["strategies"]]
    strategies = list(sizes[0]["strategies"]) if sizes else []
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.8 / max(len(strategies), 1)
    for i, name in enumerate(strategies):
        xs = [j + i * width for j in range(len(sizes))]
        a0.bar(xs, [r["strategies"][name].get("efficiency") or 0 for r in sizes], width, label=name)  # 0: no T₁
        a1.bar(xs, [r["strategies"][name]["ms"] for r in sizes], width, color=f"C{i}", label=f"{name}")
        a1.bar(xs, [r["strategies"][name]["ms_nocomm"] for r in sizes], width * 0.4, color="k", alpha=0.5,
               label="without communication" if i == 0 else None)
    labels = [(f"{r['N'] // 1024}k" if r["N"] >= 1024 else str(r["N"])) + (" (T₁ est.)" if r["T1_estimated"] else "")
              for r in sizes]
    for ax in (a0, a1):
        ax.set_xticks([j + width * (len(strategies) - 1) / 2 for j in range(len(sizes))], labels)
        ax.legend(fontsize=8)
    a0.axhline(1.0, color="k", ls=":")
    devices = result.get("devices") or ["?"]
    devices = f"{len(devices)} × {devices[0]}" if len(set(devices)) == 1 else ", ".join(devices)
    _style(a0, "sequence length N", "scaling efficiency T₁ / (P · T_P)", f"fwd+bwd, causal, bf16 — {devices}")
    a1.set_yscale("log")
    _style(a1, "sequence length N", "fwd+bwd time, slowest rank (ms)", "with and without the transfers")
    fig.tight_layout()
    return fig
