"""Measurements, figures and widgets the notebooks call, so that a notebook only explains and calls.

Every ``plot_*`` function draws one figure with labelled axes and units and returns it. Every
``*_stepper``/``*_walker`` function returns an ipywidgets slider wired to a ``plot_*`` function; where
no slider can work (no Jupyter kernel, or ``FLASHCOURSE_STATIC_WIDGETS=1`` as the notebook tests set)
it shows that function's figure instead.
"""

import io
import itertools
import math
import os
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

import matplotlib.pyplot as plt
import torch

from . import gpumodel
from .gpumodel import GPU, H100_SXM, KiB
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
        for axis in (ax.xaxis, ax.yaxis):  # indices: whole numbers only
            axis.set_major_locator(plt.MaxNLocator(integer=True))
    fig.tight_layout()
    return fig


def _memory_fit(N: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Non-negative (a, b, c) of y ≈ a + b·N + c·N²: fixed buffers, bytes per token, bytes per token pair."""
    X = torch.stack([torch.ones_like(N), N, N * N], 1)
    keep = [0, 1, 2]
    while True:  # drop a negative term and fit again (memory is never negative)
        coef = torch.zeros(3, dtype=torch.float64)
        coef[keep] = torch.linalg.lstsq(X[:, keep] / X[:, keep].amax(0), y[:, None]).solution[:, 0] / X[:, keep].amax(0)
        if (coef >= 0).all():
            return coef
        keep.remove(int(coef.argmin()))


def plot_memory_scaling(Ns: Sequence[int], measured: Dict[str, Sequence[float]], *, scale: float = 1.0,
                        scale_label: str = "", limits: Optional[Dict[str, float]] = None, extrapolate_to: int = 0):
    """Peak memory (GiB) against N on log-log axes, each curve fitted as a + b·N + c·N² and extrapolated.

    ``measured`` maps a label to bytes for one (batch, head), one per N of ``Ns`` (None where not
    measured); ``scale`` multiplies them (e.g. B·H of a real model, named by ``scale_label``);
    ``limits`` maps a GPU name to its memory in bytes and draws where each curve crosses it. The legend
    names the term that dominates at the largest N: N² (scores stored) or N (a fixed part plus bytes
    per token, which a power law through small N would bend below 1).
    """
    fig, ax = plt.subplots(figsize=(7, 4.5))
    N_max = max(extrapolate_to, max(Ns))
    grid = torch.logspace(math.log10(min(Ns)), math.log10(N_max), 200, dtype=torch.float64)
    for label, ys in measured.items():
        Nm = torch.tensor([N for N, b in zip(Ns, ys) if b is not None], dtype=torch.float64)
        y = torch.tensor([b for b in ys if b is not None], dtype=torch.float64) * scale
        a, b, c = _memory_fit(Nm, y)
        # memory(N) = a + b·N + c·N²
        fit = a + b * grid + c * grid**2
        grows = "N²" if c * N_max > b else f"N ({b / scale:,.0f} B per token + {a / scale / 1024:,.0f} KiB fixed)"
        line = ax.plot(Nm.tolist(), (y / GiB).tolist(), "o", label=f"{label}: measured")[0]
        ax.plot(grid.tolist(), (fit / GiB).tolist(), "--", color=line.get_color(), label=f"{label}: fit, grows as {grows}")
        for name, cap in (limits or {}).items():
            over = (fit >= cap).nonzero()
            if len(over):
                N_out = grid[over[0, 0]].item()
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
    from matplotlib.patches import Patch

    trace = online_softmax_trace(s, v, block)
    n_blocks = len(trace) - 1
    step = max(0, min(step, n_blocks))
    cur = trace[step]
    exact = torch.softmax(s.double(), -1).to(v.dtype) @ v
    fig, (a0, a1, a2) = plt.subplots(1, 3, figsize=(14, 4.4))
    idx = torch.arange(s.shape[-1])
    seen = idx < cur.end
    a0.bar(idx.tolist(), s.tolist(), color=["tab:blue" if x else "lightgray" for x in seen.tolist()])
    for b in range(block, s.shape[-1], block):
        a0.axvline(b - 0.5, color="k", lw=0.5, alpha=0.4)
    handles = [Patch(color="tab:blue", label=f"read: blocks 1–{step}")] if step else []
    if step < n_blocks:
        handles.append(Patch(color="lightgray", label=f"not read yet: blocks {step + 1}–{n_blocks}"))
    if step > 0:
        a0.axhline(cur.state.m.item(), color="tab:red", ls="--")
        handles.append(plt.Line2D([], [], color="tab:red", ls="--", label=f"running max m = {cur.state.m.item():.2f}"))
    title = f"after block {step} of {n_blocks}: keys 0–{cur.end - 1} read" if step else f"before block 1 of {n_blocks}"
    _style(a0, "key index j", "score s_j (logit, unitless)", title)
    a0.legend(handles=handles, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)

    ends = [t.end for t in trace[1:]]
    ms = [t.state.m.item() for t in trace[1:]]
    ls = [t.state.l.item() for t in trace[1:]]
    a1.plot(ends, ms, "o-", color="tab:red", label="m (running max)")
    a1b = a1.twinx()
    a1b.plot(ends, ls, "s-", color="tab:green", label="ℓ (running sum of exp(s − m))")
    # where a block raises the max most, the old sum shrinks by e^{m_old − m_new} before the new terms come
    jumps = [t for t in range(1, len(ms)) if ms[t] > ms[t - 1]]
    if jumps:
        t = max(jumps, key=lambda t: ms[t] - ms[t - 1])
        a1b.annotate(f"block {t + 1} raises m by {ms[t] - ms[t - 1]:.2f}:\nold ℓ × e^(−{ms[t] - ms[t - 1]:.2f}),"
                     f"\nthen + its new terms", (ends[t], ls[t]), xytext=(0.04, 0.62), textcoords="axes fraction",
                     fontsize=8, color="tab:green", arrowprops=dict(arrowstyle="->", color="tab:green", lw=1))
    if step > 0:
        a1.axvline(cur.end, color="k", alpha=0.3)
    _style(a1, "keys read so far", "m (logit)", "the running statistics")
    a1b.set_ylabel("ℓ (sum of weights, unitless)")
    lines = a1.get_lines()[:1] + a1b.get_lines()[:1]
    a1.legend(lines, [ln.get_label() for ln in lines], fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16),
              ncol=2)

    d = min(v.shape[-1], 8)
    x = torch.arange(d)
    a2.bar((x - 0.2).tolist(), cur.output[:d].tolist(), width=0.4, label="o / ℓ now")
    a2.bar((x + 0.2).tolist(), exact[:d].tolist(), width=0.4, label="softmax(s) v (all keys)")
    err = (cur.output - exact).abs().max().item()
    _style(a2, "output feature", "value (unitless)", f"partial output, max |error| = {err:.2e}")
    a2.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    a2.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    fig.tight_layout()
    return fig


def plot_merge_trees(s: torch.Tensor, v: torch.Tensor, cuts: Sequence[int]):
    """One row of scores s (N,) with values v (N, d), cut at ``cuts`` into four slices A, B, C, D, merged
    as the online softmax does, ((A ⊕ B) ⊕ C) ⊕ D, and as a parallel tree, (A ⊕ B) ⊕ (C ⊕ D).
    Every node shows its (m, ℓ); the two roots are the same state."""
    bounds = [0, *cuts, s.shape[-1]]
    if len(bounds) != 5:
        raise ValueError(f"cuts must split the row into four slices, got cuts={list(cuts)}")
    leaves = {name: block_state(s[None, a:b], v[a:b]) for name, a, b in zip("ABCD", bounds, bounds[1:])}
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))

    def node(ax, x, y, name, state, color="white"):
        o = (state.o / state.l[..., None]).flatten()[:2].tolist()
        text = f"{name}\nm = {state.m.item():.3f}\nℓ = {state.l.item():.4f}\no/ℓ = ({o[0]:.3f}, {o[1]:.3f}, …)"
        ax.text(x, y, text, ha="center", va="center", fontsize=7.5, bbox=dict(boxstyle="round", fc=color, ec="0.4"))
        return (x, y, state)

    def merge(ax, left, right, x, y, name, color="white"):
        for child in (left, right):
            ax.plot([child[0], x], [child[1], y], color="0.5", lw=1, zorder=0)
        return node(ax, x, y, name, merge_states(left[2], right[2]), color)

    roots = []
    for ax, tree in zip(axes, ("chain", "balanced")):
        A, B, C, D = (node(ax, x, 0, f"{n}: keys {a}–{b - 1}", leaves[n])
                      for x, n, a, b in zip(range(4), "ABCD", bounds, bounds[1:]))
        AB = merge(ax, A, B, 0.5, 1, "A ⊕ B")
        if tree == "chain":
            root = merge(ax, merge(ax, AB, C, 1.3, 2, "(A ⊕ B) ⊕ C"), D, 2.1, 3, "((A ⊕ B) ⊕ C) ⊕ D", "lightyellow")
            title = "the online softmax's order: one block at a time"
        else:
            root = merge(ax, AB, merge(ax, C, D, 2.5, 1, "C ⊕ D"), 1.5, 2, "(A ⊕ B) ⊕ (C ⊕ D)", "lightyellow")
            title = "a parallel tree: two workers, then one merge"
        roots.append(root[2])
        ax.set_xlim(-0.6, 3.6)
        ax.set_ylim(-0.6, 3.6)
        ax.set_xticks([])
        ax.set_yticks([0, 1, 2, 3])
        _style(ax, "slices of one row, left to right", "merge depth", title)
        ax.grid(False)
    err = (finalize(roots[0])[0] - finalize(roots[1])[0]).abs().max().item()
    fig.suptitle(f"the same state at both roots: |O difference| = {err:.1e}", fontsize=10)
    fig.tight_layout()
    return fig


STATIC_WIDGETS_ENV = "FLASHCOURSE_STATIC_WIDGETS"


def widgets_live() -> bool:
    """Whether a slider can work here: inside a Jupyter kernel, with ipywidgets, and not switched off.

    ``FLASHCOURSE_STATIC_WIDGETS=1`` switches sliders off: the notebook tests set it, because a kernel
    without a front end never answers a widget's messages and a headless run could wait on them.
    """
    if os.environ.get(STATIC_WIDGETS_ENV, "").strip().lower() not in ("", "0", "false", "no"):
        return False
    try:
        import ipywidgets  # noqa: F401
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def _png(fig) -> bytes:
    """The figure as PNG bytes; the figure is closed (so that the inline backend does not show it too)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def _slider_widget(draw: Callable[[int], object], n_steps: int, description: str, value: int = 0):
    """An IntSlider over 0..n_steps−1 with the PNG of ``draw(step)`` below it.

    Where sliders cannot work (``widgets_live()`` is False) it shows the figure of step ``value`` and
    returns None: the same picture, with nothing that waits for a front end.
    """
    if not widgets_live():
        fig = draw(value)
        try:
            from IPython.display import display

            display(fig)
            plt.close(fig)
        except ImportError:
            pass
        return None
    import ipywidgets as widgets

    slider = widgets.IntSlider(value=value, min=0, max=max(n_steps - 1, 0), description=description,
                               continuous_update=False)
    # an Image widget, not an Output widget: no display hooks, so nothing depends on the front end
    image = widgets.Image(value=_png(draw(value)), format="png")
    slider.observe(lambda change: setattr(image, "value", _png(draw(change["new"]))), names="value")
    return widgets.VBox([slider, image])


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


TILE_COLORS = {"full": "tab:blue", "masked": "tab:orange", "skipped": "white"}
TILE_LABELS = {"full": "computed, no mask", "masked": "computed, masked (crosses the mask edge)",
               "skipped": "skipped: never loaded, never computed"}
_SKIPPED_STYLE = dict(hatch="///", edgecolor="0.55")


def plot_tiles(Nq: int, Nk: int, block_m: int, block_n: int, causal: bool = False, step: Optional[int] = None,
               window: Optional[int] = None):
    """The score matrix cut into B_r × B_c tiles: computed, masked on the diagonal, or skipped.

    With ``step``, the tiles computed so far are drawn solid, those still to come faded, and the current
    one outlined in red: its Q_i, K_j, V_j and S_ij are the working set in SRAM at that step.
    """
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch, Rectangle

    tiles = tile_schedule(Nq, Nk, block_m, block_n, causal, window)
    computed = [t for t in tiles if t.kind != "skipped"]
    fig, ax = plt.subplots(figsize=(7.5, 1.6 + 4.6 * min(2.0, max(0.5, Nq / Nk))))
    current = computed[min(step, len(computed) - 1)] if step is not None and computed else None
    done = set(computed[: computed.index(current) + 1]) if current else set(computed)
    for t in tiles:
        faded = t.kind != "skipped" and t not in done
        style = _SKIPPED_STYLE if t.kind == "skipped" else dict(edgecolor="k")
        ax.add_patch(Rectangle((t.j0, t.i0), t.cols, t.rows, facecolor=TILE_COLORS[t.kind], lw=0.6,
                               alpha=0.25 if faded else 0.9, **style))
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
        title = (f"step {computed.index(current)} of {len(computed)}: Q_i rows {current.i0}–{current.i0 + current.rows - 1}, "
                 f"K_j,V_j rows {current.j0}–{current.j0 + current.cols - 1}\n({current.kind} tile)")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("key index j (tokens)")
    ax.set_ylabel("query index i (tokens)")
    handles = [Patch(facecolor=TILE_COLORS[k], label=TILE_LABELS[k], alpha=0.9,
                     **(_SKIPPED_STYLE if k == "skipped" else dict(edgecolor="k")))
               for k in TILE_LABELS if k != "masked" or edges]
    if current:
        handles += [Patch(facecolor="tab:blue", edgecolor="k", alpha=0.25, label="not computed yet (faded)"),
                    Patch(fill=False, edgecolor="red", lw=2.5, label="in SRAM now: Q_i, K_j, V_j, S_ij")]
    if edges:
        handles.append(Line2D([], [], color="tab:red", lw=1.2, label="mask edge (last key a query sees)"
                              if not window else "mask edges (first and last key a query sees)"))
    ax.legend(handles=handles, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    fig.tight_layout()
    return fig


def tile_walker(Nq: int, Nk: int, block_m: int, block_n: int, causal: bool = False):
    """A slider that walks the tiles of the forward pass in loop order (chapter 03)."""
    n = sum(t.kind != "skipped" for t in tile_schedule(Nq, Nk, block_m, block_n, causal))
    return _slider_widget(lambda t: plot_tiles(Nq, Nk, block_m, block_n, causal, step=t), n, "tile")


def plot_by_hand(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_n: int, scale: float = 1.0):
    """A forward pass small enough to follow by hand: S = scale·q kᵀ for q (Nq, d), k, v (Nk, d), one
    query block, key blocks of ``block_n``. One panel for S, then one after each key block with
    P̃ = exp(S − m) of the keys read so far and each row's running m, ℓ and o = Σ P̃ v."""
    S = scale * (q.double() @ k.double().T)
    traces = [online_softmax_trace(S[r], v.double(), block_n) for r in range(S.shape[0])]
    steps = len(traces[0]) - 1
    fig, axes = plt.subplots(1, steps + 1, figsize=(4.6 * (steps + 1), 3.6))
    Nq, Nk = S.shape

    def grid(ax, values, title, cmap):
        ax.imshow(values.numpy(), cmap=cmap, vmin=float(S.min()) if cmap == "coolwarm" else 0, aspect="auto",
                  vmax=float(S.max()) if cmap == "coolwarm" else 1)
        for (r, c), x in zip(itertools.product(range(Nq), range(Nk)), values.flatten().tolist()):
            dark = cmap == "Greens" and x > 0.6
            ax.text(c, r, "·" if math.isnan(x) else f"{x:.3g}", ha="center", va="center", fontsize=9,
                    color="w" if dark else "k")
        for j0 in range(0, Nk, block_n):
            ax.add_patch(plt.Rectangle((j0 - 0.5, -0.5), min(block_n, Nk - j0), Nq, fill=False, lw=2, ec="k"))
        ax.set_xticks(range(Nk))
        ax.set_yticks(range(Nq))
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("key index j")
        ax.set_ylabel("query index i")

    grid(axes[0], S, f"S = {scale:g}·QKᵀ, key blocks of {block_n} framed", "coolwarm")
    for t in range(1, steps + 1):
        end = traces[0][t].end
        m = torch.stack([tr[t].state.m for tr in traces])
        P = torch.exp(S - m[:, None]).masked_fill(torch.arange(Nk)[None, :] >= end, float("nan"))
        grid(axes[t], P, f"after key block {t}: P̃ = exp(S − m), keys 0–{end - 1}", "Greens")
        for r, tr in enumerate(traces):
            state, before = tr[t].state, tr[t - 1].state
            rescaled = t > 1 and state.m > before.m
            note = f"m={state.m.item():.3g} ℓ={state.l.item():.3g}\no=({', '.join(f'{x:.3g}' for x in state.o.tolist())})"
            if rescaled:
                note += f"\nm grew: old terms × e^({before.m.item() - state.m.item():.3g})"
            axes[t].text(Nk - 0.3, r, note, fontsize=7.5, va="center", color="tab:red" if rescaled else "k")
        axes[t].set_xlim(-0.5, Nk + 2.6)
    fig.tight_layout()
    return fig


def plot_loop_orders(n_units: int = 8):
    """FlashAttention-1 against FlashAttention-2 on an N × N score matrix of ``n_units`` units a side.

    (a) FA1: key blocks outside (2 units wide), query blocks inside, all in one program per (batch, head);
    numbers are the visiting order. (b) FA2: query blocks outside (2 units tall), one program each,
    key blocks inside; numbers are steps within a program. (c) inside one tile, how the four warps of a
    program share S_ij: FA1 splits K_j (columns), FA2 splits Q_i (rows).
    """
    from matplotlib.patches import Rectangle

    fig, axes = plt.subplots(1, 4, figsize=(16, 4.6), gridspec_kw=dict(width_ratios=[1, 1, 0.62, 0.62]))
    n, colors = n_units, plt.get_cmap("tab10").colors

    def matrix(ax, rows, cols, label, color):
        for i, j in itertools.product(range(n // rows), range(n // cols)):
            number, c = label(i, j), color(i, j)
            ax.add_patch(Rectangle((j * cols, i * rows), cols, rows, facecolor=c, edgecolor="k", lw=0.8, alpha=0.55))
            ax.text(j * cols + cols / 2, i * rows + rows / 2, number, ha="center", va="center", fontsize=8)
        ax.set_xlim(-0.3, n + 0.3)
        ax.set_ylim(n + 1.6, -1.5)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("keys j  →")
        ax.set_ylabel("queries i  →")

    T_r1, T_c2 = n, n
    matrix(axes[0], 1, 2, lambda i, j: j * T_r1 + i + 1, lambda i, j: colors[0])
    axes[0].annotate("", (n, -0.5), (0, -0.5), arrowprops=dict(arrowstyle="->", lw=1.5))
    axes[0].text(n / 2, -0.7, "outer: K_j, V_j read once", ha="center", va="bottom", fontsize=8)
    axes[0].text(n / 2, n + 0.25, "inner: Q_i read and O_i, ℓ_i, m_i read + written\nonce per key block "
                 "(T_c times); one program\nper (batch, head): B·H programs in all", ha="center", va="top", fontsize=8)
    axes[0].set_title("(a) FlashAttention-1: keys outside", fontsize=10)

    matrix(axes[1], 2, 1, lambda i, j: j + 1, lambda i, j: colors[i % 10])
    axes[1].annotate("", (n, -0.5), (0, -0.5), arrowprops=dict(arrowstyle="->", lw=1.5))
    axes[1].text(n / 2, -0.7, "inner: K_j, V_j re-read by every program", ha="center", va="bottom", fontsize=8)
    axes[1].text(n / 2, n + 0.25, f"outer: one program per query block (colour),\nin parallel over the sequence: "
                 f"B·H·T_r programs;\nO_i, L_i written once, after step {T_c2}", ha="center", va="top", fontsize=8)
    axes[1].set_title("(b) FlashAttention-2: queries outside", fontsize=10)

    for ax, split, title, note in (
            (axes[2], "cols", "(c) FA1 tile: warps split K_j", "each warp has every row's\npartial P̃V: "
             "summed through\nshared memory"),
            (axes[3], "rows", "(d) FA2 tile: warps split Q_i", "each warp owns its rows:\nm, ℓ, O private, "
             "no\nexchange between warps")):
        for w in range(4):
            xy, wh = ((w, 0), (1, 4)) if split == "cols" else ((0, w), (4, 1))
            ax.add_patch(Rectangle(xy, *wh, facecolor=colors[w + 4], edgecolor="k", alpha=0.6))
            ax.text(xy[0] + wh[0] / 2, xy[1] + wh[1] / 2, f"warp {w}", ha="center", va="center", fontsize=8,
                    rotation=90 if split == "cols" else 0)
        ax.set_xlim(-0.3, 4.3)
        ax.set_ylim(6.4, -0.6)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("B_c keys of K_j")
        ax.set_ylabel("B_r rows of Q_i")
        ax.text(2, 4.3, note, ha="center", va="top", fontsize=8)
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_io(Ns: Sequence[int], d: int, M: int, *, fa2_blocks=(128, 64), N_fixed: int = 4096,
            Ms: Optional[Sequence[int]] = None):
    """HBM traffic of standard attention and of FlashAttention's two loop orders (forward, fp16, one head).

    Left: against N, FlashAttention-1 with the paper's blocks for SRAM size ``M`` and FlashAttention-2
    with its kernels' ``fa2_blocks`` (B_r, B_c); markers are counts from walking the loops
    (``flashcourse.iomodel``), lines the closed forms. Right: the closed forms against M at ``N_fixed``,
    each loop order with the blocks M allows, and FlashAttention-2's loops with FlashAttention-1's
    blocks (B_r <= d).
    """
    from . import iomodel

    MiB = 2**20
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(13, 5.4))
    B_r1, B_c1 = iomodel.block_sizes(M, d, "fa1")
    curves = {  # label: (color, marker, dict of flash_attention_io arguments; None = standard)
        "standard (3 kernels)": ("tab:red", "o", None),
        f"FA1 loops, B_c = ⌈M/4d⌉ = {B_c1}, B_r = {B_r1}": ("tab:blue", "s", dict(M=M, order="fa1")),
        f"FA2 loops, B_r = {fa2_blocks[0]}, B_c = {fa2_blocks[1]} (its kernels)":
            ("tab:green", "^", dict(block_m=fa2_blocks[0], block_n=fa2_blocks[1], order="fa2")),
    }
    for label, (color, marker, kw) in curves.items():
        walked = [(iomodel.standard_attention_io(N, d) if kw is None else iomodel.flash_attention_io(N, d, **kw)).total
                  for N in Ns]
        closed = [iomodel.standard_closed_form(N, d) if kw is None else iomodel.flash_closed_form(N, d, **kw) for N in Ns]
        a0.plot(Ns, [w / MiB for w in walked], marker, color=color)
        a0.plot(Ns, [c / MiB for c in closed], "-", color=color, label=f"{label}: {closed[-1] / Ns[-1] ** 2 / 2:.2f}·N²")
    a0.set_xscale("log", base=2)
    a0.set_yscale("log")
    _style(a0, "sequence length N (tokens)", "HBM traffic per head (MiB, fp16)",
           f"against N (d = {d}, M = {M:,} elements); markers: loops walked")
    a0.legend(fontsize=8, title="lines: closed forms, in elements", title_fontsize=8)

    N = N_fixed
    Ms = list(Ms or [4 * d * 2**k for k in range(2, 11) if 4 * d * 2**k <= N * d])
    std = iomodel.standard_attention_io(N, d).total / MiB
    a1.axhline(std, color="tab:red", label="standard (3 kernels)")
    by_rule = {
        "FA1 loops, FA1 blocks: B_c = ⌈M/4d⌉, B_r = min(B_c, d)": ("tab:blue", "s", "fa1", "fa1"),
        "FA2 loops, FA2-style blocks: B_r = ⌈M/4d⌉, B_c = min(B_r, d)": ("tab:green", "^", "fa2", "fa2"),
        "FA2 loops, FA1 blocks (B_r <= d): K, V re-read >= N/d times": ("tab:purple", "v", "fa2", "fa1"),
    }
    for label, (color, marker, order, rule) in by_rule.items():
        blocks = [iomodel.block_sizes(m, d, rule) for m in Ms]
        ys = [iomodel.flash_closed_form(N, d, block_m=b[0], block_n=b[1], order=order) / MiB for b in blocks]
        a1.plot(Ms, ys, marker + "-", color=color, label=label)
    bound = [2 * iomodel.lower_bound_shape(N, d, m) / MiB for m in Ms]
    a1.plot(Ms, bound, "k--", lw=1, label="N²d²/M elements: the lower bound's growth")
    small = [m for m in Ms if iomodel.block_sizes(m, d, "fa1")[0] < d / 2]
    if small:
        a1.axvspan(Ms[0] / 1.3, small[-1] * 1.4, color="tab:purple", alpha=0.08)
        a1.text(Ms[0], min(bound), "SRAM this small: blocks of < d/2 rows\nre-read so often that every tiled loop\n"
                "moves more bytes than S and P", fontsize=7.5, color="tab:purple", va="bottom")
    for name, shared_kb in (("A100", 164), ("H100", 227)):  # shared memory per block, in fp16 elements
        m = shared_kb * 1024 // 2
        if Ms[0] <= m <= Ms[-1]:
            a1.axvline(m, color="gray", ls=":", lw=1)
            a1.text(m * 1.04, max(bound) * 3, f"{name}: {shared_kb} KB", rotation=90, fontsize=7, color="gray")
    a1.set_xscale("log", base=2)
    a1.set_yscale("log")
    _style(a1, "SRAM size M (elements)", "HBM traffic per head (MiB, fp16)",
           f"against the SRAM size (N = {N}, d = {d}); closed forms")
    a1.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.45, -0.14), ncol=2)
    fig.tight_layout()
    return fig


def plot_paper_comparison(comparison):
    """The FlashAttention-1 paper's GPT-2 measurement next to the model of it (``iomodel.fa1_paper_comparison``):
    standard attention's passes stacked, FlashAttention's forward + backward, the measured GB as lines."""
    fig, ax = plt.subplots(figsize=(9, 4.6))
    colors = iter(plt.get_cmap("tab20").colors)
    for x, bars in ((0, [(f"fwd: {p.name}", p.io) for p in comparison.standard_forward]
                     + [(f"bwd: {p.name}", p.io) for p in comparison.standard_backward]),
                    (1, [("fwd: FlashAttention-1 forward", comparison.flash_forward),
                         ("bwd: FlashAttention-1 backward", comparison.flash_backward)])):
        bottom = 0.0
        for name, io in bars:
            gb = io.total / 1e9
            ax.bar(x, gb, bottom=bottom, color=next(colors), edgecolor="w", lw=0.5, label=f"{name} ({gb:.1f} GB)")
            bottom += gb
    for x, gb in ((0, comparison.measured_standard_gb), (1, comparison.measured_flash_gb)):
        ax.plot([x - 0.42, x + 0.42], [gb, gb], "k--", lw=1.5)
        ax.text(x + 0.44, gb, f"measured\n{gb} GB", fontsize=8, va="center")
    ax.text(1, comparison.flash / 1e9 + 1, f"model {comparison.flash / 1e9:.1f} GB", ha="center", fontsize=8)
    ax.set_xticks([0, 1], ["standard attention\n(separate kernels)", "FlashAttention-1\n(forward + backward)"])
    ax.set_xlim(-0.6, 2.0)
    _style(ax, "implementation", "HBM reads + writes (GB)",
           f"GPT-2 medium attention, forward + backward: model {comparison.ratio:.1f}×, "
           f"measured {comparison.measured_ratio:.1f}×")
    ax.grid(False, axis="x")
    ax.legend(fontsize=7, loc="upper right", ncol=1, title="model, pass by pass", title_fontsize=7)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------------
# Chapters 04 and 09: the GPU under the kernel (the model is flashcourse.gpumodel)
# ----------------------------------------------------------------------------------------------------


def _config_name(d: int, e: int, B_r: int, B_c: int, warps: int, stages: int) -> str:
    dtype = {2: "fp16", 4: "fp32"}.get(e, f"{8 * e}-bit")
    return f"d={d} {dtype} · {B_r}×{B_c} · {warps} warps · {stages} stages"


def plot_kernel_budget(shapes: Sequence[tuple], gpu: GPU = H100_SXM):
    """What forward programs ask of one SM of ``gpu``: shared memory (Q_i and num_stages buffers of K_j
    and V_j, stacked) and the registers a thread needs at least for the fp32 tiles O_i and S_ij, each
    against its limit, with the programs per SM each allows (``gpumodel.kernel_budget``).

    ``shapes`` are (d, bytes per element, B_r, B_c, num_warps, num_stages).
    """
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(13, 0.45 * len(shapes) + 2.4), sharey=True, layout="constrained")
    budgets = [gpumodel.kernel_budget(B_r, B_c, w, s, d=d, bytes_per_element=e, gpu=gpu) for d, e, B_r, B_c, w, s in shapes]
    half_sm = (gpu.shared_per_sm - 2 * gpu.reserved_shared_per_program) / 2
    for y, ((d, e, B_r, B_c, warps, stages), b) in enumerate(zip(shapes, budgets)):
        left = 0
        parts = [("Q_i", B_r, "tab:blue"), (f"{stages} × K_j", stages * B_c, "tab:orange"), (f"{stages} × V_j", stages * B_c, "tab:green")]
        for name, rows, color in parts:  # rows of d elements of e bytes
            size = e * rows * d / KiB
            a0.barh(y, size, left=left, color=color, edgecolor="w", label=name.split(" × ")[-1] if y == 0 else None)
            left += size
        text = f"{left:.0f} KiB: " + (f"{b.by_shared} / SM" if b.by_shared else "✗ does not launch")
        a0.text(left + 3, y, text, va="center", fontsize=8, color="k" if b.by_shared else "tab:red")
        a1.barh(y, b.registers, color="tab:cyan")
        two = min(gpu.max_registers_per_thread, gpu.registers_per_sm // (2 * 32 * warps))
        a1.plot([two], [y], "|", color="tab:purple", markersize=14, mew=2.5,
                label="most a thread may use for two programs per SM" if y == 0 else None)
        text = f"≥ {b.registers}: " + (f"≤ {b.by_registers} / SM" if not b.spills else "spills")
        a1.text(max(b.registers, two) + 4, y, text, va="center", fontsize=8, color="tab:red" if b.spills else "k")
    a0.axvline(gpu.shared_per_program / KiB, color="tab:red", ls="--", label=f"one program's limit ({gpu.shared_per_program // KiB} KiB)")
    a0.axvline(half_sm / KiB, color="tab:purple", ls=":", label=f"two programs per SM ({half_sm / KiB:.0f} KiB each)")
    a0.set_xlim(0, max(gpu.shared_per_program, max(b.shared_bytes for b in budgets)) / KiB * 1.45)
    a0.set_yticks(range(len(shapes)), [_config_name(*s) for s in shapes], fontsize=8)
    a0.invert_yaxis()
    _style(a0, "shared memory of one program (KiB)", "forward configuration",
           f"Q_i + num_stages · (K_j + V_j) ≤ {gpu.shared_per_program // KiB} KiB\n(right of a bar: the programs per SM it allows)")
    a1.axvline(gpu.max_registers_per_thread, color="tab:red", ls="--", label=f"a thread's limit ({gpu.max_registers_per_thread})")
    a1.set_xlim(0, gpu.max_registers_per_thread * 1.45)
    _style(a1, "32-bit registers a thread (at least)", "",
           "fp32 tiles O_i (B_r × d) and S_ij (B_r × B_c) alone\n(right of a bar: the programs per SM they allow)")
    handles = {label: h for ax in (a0, a1) for h, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncol=3, fontsize=8)
    fig.suptitle(f"What one forward program asks of an {gpu.name} SM ({gpu.registers_per_sm // 1024} Ki registers, "
                 f"{gpu.shared_per_sm // KiB} KiB shared memory, {gpu.max_threads_per_sm} threads)", fontsize=10)
    return fig


PIPELINE_CASES = {
    "num_stages = 1: each load waits for the math": dict(stages=1),
    "num_stages = 3: loads run ahead (software pipelining)": dict(stages=3),
    "… and QKᵀ of block j+1 issued before PV of block j (FA3, inside a warpgroup)": dict(stages=3, overlap_softmax=True),
    "… or two warpgroups taking turns (FA3's ping-pong; hatched: warpgroup 1)": dict(stages=3, warpgroups=2),
}


def plot_pipeline(n_blocks: int, load: float, matmul: float, exp: float, cases: Dict[str, dict] = PIPELINE_CASES):
    """Gantt charts of one program's key loop on the loads, the tensor cores and the exp unit
    (``gpumodel.pipeline_schedule`` with each of ``cases``' options), with the time each takes and
    the share of it the tensor cores are busy."""
    colors = {"K_j, V_j": "tab:gray", "QKᵀ": "tab:blue", "exp": "tab:orange", "PV": "tab:green"}
    schedules = [gpumodel.pipeline_schedule(n_blocks, load, matmul, exp, **kw) for kw in cases.values()]
    fig, axes = plt.subplots(len(cases), 1, figsize=(12, 1.7 * len(cases) + 0.8), sharex=True, layout="constrained")
    for ax, title, events in zip(axes, cases, schedules):
        for e in events:
            y = gpumodel.UNITS.index(e.unit)
            ax.barh(y, e.end - e.start, left=e.start, height=0.7, color=colors[e.op], edgecolor="k", lw=0.5,
                    hatch="///" if e.warpgroup else None)
            ax.text((e.start + e.end) / 2, y, str(e.block), ha="center", va="center", fontsize=7)
        total = max(e.end for e in events)
        busy = sum(e.end - e.start for e in events if e.unit == "tensor cores")
        ax.set_title(f"{title}: {total:.1f} time units, tensor cores busy {busy / total:.0%}", fontsize=9, loc="left")
        ax.set_yticks(range(len(gpumodel.UNITS)), gpumodel.UNITS, fontsize=8)
        ax.set_ylim(len(gpumodel.UNITS) - 0.4, -0.6)
        ax.set_ylabel("unit", fontsize=8)
        ax.grid(True, axis="x", alpha=0.3)
    axes[-1].set_xlim(0, max(max(e.end for e in s) for s in schedules) * 1.01)
    axes[-1].set_xlabel(f"time (one unit = QKᵀ + PV of one tile on the tensor cores; exp {exp:.2f}, load {load:.2f}); "
                        "the number in a bar is the key block j")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    fig.legend(handles, list(colors), loc="outside upper right", ncol=4, fontsize=8)
    return fig


# ----------------------------------------------------------------------------------------------------
# Chapter 09: the roofline and recorded speed
# ----------------------------------------------------------------------------------------------------


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
