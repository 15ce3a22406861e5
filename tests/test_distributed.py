"""Ring attention and Ulysses (flashcourse.distributed) against single-process flash_attention.

The layout, schedule and fold tests run in this process. The strategies run in 4 processes joined by
gloo (``distributed.launch``), started once for all cases: two groups of 2 ranks ({0, 1} and {2, 3},
whose group ranks differ from their global ones) split the 2-rank cases, then all 4 run theirs.
On a GPU machine the ranks share the one GPU: their tensors are on cuda:0 and gloo stages the
transfers through CPU memory. float32 must match flash_attention over the whole sequence to 1e-5 (on
a GPU with IEEE float32 matmuls, PyTorch's default "highest" precision); bfloat16 follows flash-attn's
rule: its error against float64 at most twice that of the single-process kernel in bfloat16, plus a
small atol.
"""

import math

import pytest
import torch
import torch.distributed as dist

import flashcourse as fc
from flashcourse import distributed as D
from flashcourse._env import resolve_device
from flashcourse.reference import naive_attention, naive_attention_backward
from helpers import make_qkv

# one case of a spawned group: (strategy, layout, causal, dtype, B, H, Hkv, N, d)
P2_CASES = [
    ("ring", "zigzag", True, torch.float32, 1, 4, 2, 32, 16),
    ("ring", "contiguous", True, torch.float32, 2, 2, 2, 32, 16),
    ("ring", "zigzag", False, torch.float32, 1, 2, 2, 32, 16),
    ("ring", "contiguous", False, torch.float32, 1, 4, 2, 32, 16),
    ("ulysses", "contiguous", True, torch.float32, 1, 4, 2, 32, 16),
    ("ulysses", "contiguous", False, torch.float32, 1, 2, 2, 32, 16),
    ("ring", "zigzag", True, torch.bfloat16, 1, 2, 2, 32, 16),
    ("ulysses", "contiguous", True, torch.bfloat16, 1, 2, 2, 32, 16),
]
P4_CASES = [
    ("ring", "zigzag", True, torch.float32, 1, 4, 2, 32, 16),
    ("ulysses", "contiguous", True, torch.float32, 1, 4, 4, 32, 16),
]
ATOL_FP32 = 1e-5
ATOL_LOW = 1e-3  # bfloat16: beside twice the single-process error
# a rank that waits longer than this for a peer fails; on a GPU the first calls also compile kernels
LAUNCH_TIMEOUT_S = 300 if torch.cuda.is_available() else 90


def _device() -> str:
    """The package's device policy (the ``device`` fixture's), also inside the spawned ranks."""
    return resolve_device(None).type


def _inputs(case, seed):
    strategy, layout, causal, dtype, B, H, Hkv, N, d = case
    q, k, v = make_qkv(B=B, H=H, Hkv=Hkv, Nq=N, d=d, seed=seed)
    do = make_qkv(B=B, H=H, Nq=N, d=d, seed=seed + 100)[0]
    return q, k, v, do


def _attend(strategy, q, k, v, causal, layout, group=None, communicate=True):
    if strategy == "ring":
        return D.ring_attention(q, k, v, causal=causal, layout=layout, group=group, communicate=communicate)
    return D.ulysses_attention(q, k, v, causal=causal, group=group, communicate=communicate)


def _run_cases(rank, world_size, cases, group=None):
    """In one rank of ``group``: each (seed, case) through its strategy, forward and backward. Returns
    {seed: (o, dq, dk, dv) shards on the CPU}, and O without the transfers for the first case."""
    device = _device()
    results, wrong = {}, None
    for seed, case in cases:
        strategy, layout, causal, dtype = case[:4]
        q, k, v, do = (
            D.shard(t, rank, world_size, layout).to(device, dtype).requires_grad_(i < 3)
            for i, t in enumerate(_inputs(case, seed))
        )
        o = _attend(strategy, q, k, v, causal, layout, group=group)
        o.backward(do)
        results[seed] = [t.detach().cpu() for t in (o, q.grad, k.grad, v.grad)]
        if wrong is None:  # without the transfers the same kernels must give a wrong answer: the check can fail
            wrong = _attend(strategy, q, k, v, causal, layout, group=group, communicate=False).detach().cpu()
    return results, wrong


def _argument_errors():
    """The messages of the divisibility checks that need the group's size."""
    x = torch.zeros(1, 3, 3, 16, device=_device())
    errors = []
    for call in (lambda: D.ring_attention(x, x, x, layout="zigzag"),  # N = 3P: not divisible by 2P
                 lambda: D.ulysses_attention(x, x, x)):  # H = 3: not divisible by P
        try:
            call()
        except ValueError as e:
            errors.append(str(e))
    return errors


def _four_ranks(rank, world_size):
    """Ranks {0, 1} and {2, 3} each run half of P2_CASES in their own group (the group ranks differ from
    the global ones for {2, 3}); then all four run P4_CASES."""
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    half = rank // 2
    return dict(
        pair=_run_cases(rank % 2, 2, list(enumerate(P2_CASES))[half::2], group=pairs[half]),
        world=_run_cases(rank, 4, list(enumerate(P4_CASES))),
        errors=_argument_errors(),
    )


@pytest.fixture(scope="module")
def four_ranks():
    """What each of 4 gloo ranks returned (one start-up for all the multi-process checks)."""
    return D.launch(_four_ranks, 4, timeout=LAUNCH_TIMEOUT_S)


def _references(case, seed):
    """(flash_attention's (o, dq, dk, dv) over the whole sequence in the case's dtype, float64's)."""
    strategy, layout, causal, dtype = case[:4]
    q, k, v, do = _inputs(case, seed)
    want64 = (naive_attention(q, k, v, causal=causal),)
    want64 += naive_attention_backward(q, k, v, want64[0], do, causal=causal)
    q, k, v = (t.to(_device(), dtype).requires_grad_() for t in (q, k, v))
    o = fc.flash_attention(q, k, v, causal=causal)
    o.backward(do.to(o))
    return [t.detach().cpu() for t in (o, q.grad, k.grad, v.grad)], want64


def _check(P, cases, rank_results):
    """Glue each case's shards (rank_results: one (results, wrong) per rank, in group order) and
    compare with flash_attention over the whole sequence."""
    for seed, case in cases:
        layout, dtype = case[1], case[3]
        flash, exact = _references(case, seed)
        for i, (name, want, want64) in enumerate(zip(("O", "dQ", "dK", "dV"), flash, exact)):
            got = D.unshard([r[0][seed][i] for r in rank_results], layout)
            assert got.dtype == want.dtype and got.shape == want.shape, (case, name)
            assert torch.isfinite(got).all(), (case, name)
            if dtype == torch.float32:
                err = (got - want).abs().max().item()
                assert err <= ATOL_FP32, f"P={P} {case}: {name} differs from flash_attention by {err:.2e}"
            else:
                err = (got.double() - want64).abs().max().item()
                base = (want.double() - want64).abs().max().item()
                assert err <= 2 * base + ATOL_LOW, (
                    f"P={P} {case}: {name} error {err:.2e} vs float64, single-process {base:.2e}"
                )
    seed, case = cases[0]
    wrong = D.unshard([r[1] for r in rank_results], case[1])
    assert (wrong - _references(case, seed)[0][0]).abs().max() > 0.01, f"{case}: communicate=False gave the right O"


@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 60)
def test_two_ranks_match_flash_attention(four_ranks):
    for half in (0, 1):
        _check(2, list(enumerate(P2_CASES))[half::2], [r["pair"] for r in four_ranks[2 * half:2 * half + 2]])


@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 60)
def test_four_ranks_match_flash_attention(four_ranks):
    _check(4, list(enumerate(P4_CASES)), [r["world"] for r in four_ranks])


def test_divisibility_errors_in_a_group(four_ranks):
    for r in four_ranks:
        ring_error, ulysses_error = r["errors"]
        assert "divisible by 8" in ring_error and "layout='contiguous'" in ring_error, ring_error
        assert "H = 3" in ulysses_error, ulysses_error


# ----------------------------------------------------------------------------------------------------
# In this process: layouts, the schedule, the fold
# ----------------------------------------------------------------------------------------------------


def test_zigzag_positions():
    # 2P = 4 chunks of 2: rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2
    assert D.shard_positions(8, 0, 2, "zigzag").tolist() == [0, 1, 6, 7]
    assert D.shard_positions(8, 1, 2, "zigzag").tolist() == [2, 3, 4, 5]
    assert D.shard_positions(8, 1, 2, "contiguous").tolist() == [4, 5, 6, 7]


@pytest.mark.parametrize("layout", D.LAYOUTS)
@pytest.mark.parametrize("P", [1, 2, 3, 4])
def test_shard_unshard_round_trip(layout, P):
    x = torch.randn(2, 3, 24, 5)
    for dim in (2, -2, 0 if P == 1 else 2):
        shards = [D.shard(x, r, P, layout, dim=dim) for r in range(P)]
        assert all(s.shape[dim] == x.shape[dim] // P for s in shards)
        assert torch.equal(D.unshard(shards, layout, dim=dim), x)
    # every position is held by exactly one rank
    held = torch.cat([D.shard_positions(24, r, P, layout) for r in range(P)])
    assert sorted(held.tolist()) == list(range(24))


def test_divisibility_and_layout_errors():
    x = torch.randn(1, 1, 6, 4)
    with pytest.raises(ValueError, match="not divisible by 4"):
        D.shard(x, 0, 2, "zigzag")
    with pytest.raises(ValueError, match="not divisible by 4"):
        D.shard(x, 0, 4, "contiguous")
    with pytest.raises(ValueError, match="layout must be one of"):
        D.shard(x, 0, 2, "striped")
    with pytest.raises(ValueError, match="rank must be in"):
        D.shard(x, 2, 2, "contiguous")
    assert D.shard(x, 1, 3, "contiguous").shape[2] == 2


def test_fold_is_merge_of_two_key_sets():
    q, k, v = make_qkv(B=1, H=2, Nq=9, Nk=14, d=8)
    O, L = naive_attention(q, k, v, return_lse=True)
    Oa, La = naive_attention(q, k[:, :, :5], v[:, :, :5], return_lse=True)
    Ob, Lb = naive_attention(q, k[:, :, 5:], v[:, :, 5:], return_lse=True)
    Of, Lf = D.fold(Oa, La, Ob, Lb)
    assert Of.dtype == torch.float32
    torch.testing.assert_close(Of.double(), O, atol=1e-6, rtol=0)
    torch.testing.assert_close(Lf.double(), L, atol=1e-5, rtol=0)
    # a row that saw no key (L = −inf, O = 0) takes the other side exactly; two such rows stay empty
    empty_O, empty_L = torch.zeros_like(Oa), torch.full_like(La, -math.inf)
    Oe, Le = D.fold(empty_O, empty_L, Ob, Lb)
    assert torch.equal(Oe, Ob.float()) and torch.equal(Le, Lb.float())
    Oe, Le = D.fold(empty_O, empty_L, empty_O, empty_L)
    assert not Oe.isnan().any() and (Oe == 0).all() and torch.isneginf(Le).all()


@pytest.mark.parametrize("layout", D.LAYOUTS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("P", [1, 2, 3, 4])
def test_schedule_covers_each_visible_block_once(layout, causal, P):
    chunks = D.num_chunks(P, layout)
    seen = torch.zeros(chunks, chunks, dtype=torch.int64)  # (query chunk, key chunk)
    for r in range(P):
        mine = D.shard_chunks(r, P, layout)
        for s, blocks in enumerate(D.ring_schedule(r, P, layout, causal)):
            theirs = D.shard_chunks((r - s) % P, P, layout)
            for b in blocks:
                for a_ in mine[b.q0:b.q1]:
                    for b_ in theirs[b.k0:b.k1]:
                        # a causal call (step 0 only) masks the key chunks after the query chunk
                        assert not b.causal or s == 0
                        seen[a_, b_] += not b.causal or b_ <= a_
    everything = torch.ones(chunks, chunks, dtype=torch.int64)
    want = torch.tril(everything) if causal else everything
    assert torch.equal(seen, want)


def test_zigzag_balances_causal_work():
    for P in (2, 4, 8):
        zig, con = D.step_work(P, "zigzag"), D.step_work(P, "contiguous")
        # zigzag: every rank does half a (N/P)² block at every step; contiguous: rank r idles after step r
        assert torch.equal(zig, torch.full((P, P), 0.5))
        assert con.sum() == zig.sum() and con[0, 1:].eq(0).all() and con[-1, 1:].eq(1).all()
        # a step lasts as long as its busiest rank
        assert con.amax(0).sum() == 0.5 + (P - 1) and zig.amax(0).sum() == 0.5 * P
    assert torch.equal(D.step_work(3, "zigzag", causal=False), torch.ones(3, 3))
    # and each zigzag step is one kernel call: the two chunk-pairs form one rectangle
    assert all(len(blocks) == 1 for r in range(4) for blocks in D.ring_schedule(r, 4, "zigzag"))


@pytest.mark.parametrize("layout", D.LAYOUTS)
def test_simulated_ring_matches_flash_attention(layout, device):
    q, k, v = make_qkv(B=1, H=2, Hkv=1, Nq=24, d=16, dtype=torch.float32)
    q, k, v = (t.to(device) for t in (q, k, v))
    for P, causal in ((3, True), (2, False)):
        O, L = D.simulate_ring_forward(q, k, v, P, causal=causal, layout=layout)
        want, want_L = fc.flash_attention(q, k, v, causal=causal, return_lse=True)
        torch.testing.assert_close(O, want, atol=ATOL_FP32, rtol=0)
        torch.testing.assert_close(L, want_L, atol=ATOL_FP32, rtol=0)


def test_communication_volumes():
    kw = dict(N=1 << 20, H=16, d=128)
    ring, uly = D.communication_bytes("ring", world_size=2, **kw), D.communication_bytes("ulysses", world_size=2, **kw)
    # P = 2, Hkv = H: the ring sends K and V once; Ulysses sends half of q, k, v and O: the same bytes
    assert ring.total == uly.total == 2 * 16 * (1 << 19) * 128 * 2
    ring8, uly8 = (D.communication_bytes(s, world_size=8, **kw) for s in ("ring", "ulysses"))
    # ring: (P − 1)·2·Hkv, Ulysses: (2H + 2Hkv)(P − 1)/P per shard: Ulysses sends 2/P as much at Hkv = H
    assert uly8.total / ring8.total == pytest.approx(2 / 8)
    assert ring8.rounds == 7 and uly8.rounds == 2
    with pytest.raises(ValueError, match="strategy"):
        D.communication_bytes("tree", world_size=2, **kw)
    # overlap: the crossover shard length makes compute and transfer equal
    n = D.overlap_crossover(H=16, flops_per_s=400e12, bytes_per_s=100e9)
    t_compute, t_transfer = D.ring_step_times(round(n), H=16, d=128, flops_per_s=400e12, bytes_per_s=100e9)
    assert t_compute == pytest.approx(t_transfer)


def test_argument_errors_before_any_communication():
    q = torch.zeros(1, 2, 8, 16)
    with pytest.raises(ValueError, match="as many positions"):
        D.ring_attention(q, q[:, :, :4], q[:, :, :4])
    with pytest.raises(TypeError, match="float16, bfloat16 and float32"):
        D.ulysses_attention(q.double(), q.double(), q.double())


def test_chapter_figures_have_labelled_axes():
    import matplotlib.pyplot as plt

    from flashcourse import viz

    s = dict(ms=10.0, ms_nocomm=8.0, efficiency=0.9)
    run = dict(devices=["GPU", "GPU"], sizes=[dict(N=32768, T1_estimated=False, strategies={"ring-zigzag": s}),
                                             dict(N=65536, T1_estimated=True, strategies={})])
    for fig in (viz.plot_ring_balance(4), viz.plot_ring_overlap(H=8, Hkv=2), viz.plot_ring_benchmark(run)):
        assert all(ax.get_xlabel() and ax.get_ylabel() for ax in fig.axes)
        plt.close(fig)
