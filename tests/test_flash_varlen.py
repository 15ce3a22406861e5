"""flash-attn's variable-length functions: packed sequences, one launch, forward and backward.

The oracle is ``naive_attention`` run sequence by sequence (float64, and the inputs' precision for
flash-attn's accuracy rule: the kernels' error at most twice the low-precision reference's, plus a
small atol), on every element of out, dq, dk, dv. The packed tensors end with rows of NaN that belong
to no sequence: the kernels must never read them, and must leave out, dq, dk, dv zero there.
Sequences of length 0, Nq ≠ Nk per sequence, grouped heads and every score option are covered by a
pairwise subset at small sizes (d <= 32, N <= 40); GPU sizes are in test_gpu_varlen.py.
"""

import inspect

import pytest
import torch
import torch.nn.functional as F

import flashcourse
from flashcourse import (FlashCrossAttention, FlashSelfAttention, flash_attn_func, flash_attn_varlen_func,
                         flash_attn_varlen_kvpacked_func, flash_attn_varlen_qkvpacked_func, naive_attention)
from flashcourse.flash_attn_interface import pad_input, unpad_input
from flash_reference import max_error, reference_attention
from test_flash_options import ATOL, DTYPES, HEADS, OPTIONS, _slopes, pairwise

# (Nq, Nk) of each sequence of a batch
LENGTHS = {
    "equal": [(17, 17), (32, 32), (5, 5)],
    "mixed": [(9, 40), (30, 12), (1, 23), (7, 1)],  # Nq < Nk and Nq > Nk, one query, one key
    "empty": [(0, 5), (13, 0), (0, 0), (21, 21)],  # no queries, no keys, neither
}
POISON_ROWS = 3  # rows of NaN after the last sequence of q, k and v


def cu_seqlens(lengths, device) -> torch.Tensor:
    """int32 (B + 1,): 0, n_0, n_0 + n_1, ..."""
    return F.pad(torch.tensor(lengths, dtype=torch.int32).cumsum(0), (1, 0)).to(torch.int32).to(device)


def packed_inputs(lengths, H, Hkv, d, dtype, seed, device):
    """q (total_q + 3, H, d), k, v (total_k + 3, Hkv, d), NaN in the last 3 rows; cu_seqlens_q, cu_seqlens_k."""
    g = torch.Generator().manual_seed(seed)
    nq, nk = sum(a for a, _ in lengths), sum(b for _, b in lengths)
    q = torch.randn(nq + POISON_ROWS, H, d, generator=g)
    k, v = (torch.randn(nk + POISON_ROWS, Hkv, d, generator=g) for _ in range(2))
    for t, n in ((q, nq), (k, nk), (v, nk)):
        t[n:] = float("nan")
    cu_q, cu_k = (cu_seqlens([n[i] for n in lengths], device) for i in (0, 1))
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype), cu_q, cu_k


def varlen_reference(q, k, v, cu_q, cu_k, *, dtype, keep=None, alibi_slopes=None, return_lse=False, **options):
    """naive_attention on each sequence in ``dtype``: out (rows, H, d) like q's rows (0 past the last
    sequence and for a sequence with no key), differentiable; with ``return_lse`` also lse (H, rows)."""
    outs, lses = [], []
    cu_q, cu_k = cu_q.tolist(), cu_k.tolist()
    for b in range(len(cu_q) - 1):
        (q0, q1), (k0, k1) = cu_q[b:b + 2], cu_k[b:b + 2]
        if q1 == q0:
            continue
        if k1 == k0:  # no key: O = 0, L = −inf
            outs.append(torch.zeros(q1 - q0, q.shape[1], q.shape[2], dtype=dtype, device=q.device))
            lses.append(torch.full((q.shape[1], q1 - q0), float("-inf"), dtype=torch.float64, device=q.device))
            continue
        qb, kb, vb = (t[a:e].transpose(0, 1)[None].to(dtype) for t, a, e in ((q, q0, q1), (k, k0, k1), (v, k0, k1)))
        slopes = None if alibi_slopes is None else (alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[b])
        o, lse = naive_attention(qb, kb, vb, alibi_slopes=slopes, return_lse=True, upcast=False,
                                 dropout_mask=None if keep is None else keep[b:b + 1, :, :q1 - q0, :k1 - k0], **options)
        outs.append(o[0].transpose(0, 1))
        lses.append(lse[0].double())
    rest = q.shape[0] - cu_q[-1]
    out = torch.cat(outs + [torch.zeros(rest, *q.shape[1:], dtype=dtype, device=q.device)])
    return (out, torch.cat(lses, dim=1)) if return_lse else out


def check_varlen(device, dtype, lengths, H, Hkv, d, seed=0, **options):
    """out, lse, S_dmask and the gradients of flash_attn_varlen_func against the per-sequence reference."""
    B = len(lengths)
    if isinstance(options.get("alibi_slopes"), str):
        options["alibi_slopes"] = _slopes(options["alibi_slopes"], B, H, device)
    q, k, v, cu_q, cu_k = packed_inputs(lengths, H, Hkv, d, dtype, seed, device)
    max_q, max_k = max(n for n, _ in lengths), max(n for _, n in lengths)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    dropout_p = options.pop("dropout_p", 0.0)
    torch.manual_seed(seed)
    out, lse, S_dmask = flash_attn_varlen_func(*leaves, cu_q, cu_k, max_q, max_k, dropout_p, return_attn_probs=True,
                                               **options)
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(device, dtype)
    got = (out, *torch.autograd.grad(out, leaves, do))
    rows = cu_q[-1].item()
    for name, g in zip(("out", "dq", "dk", "dv"), got):  # rows of no sequence: zero, never NaN
        assert (g[(rows if name in ("out", "dq") else cu_k[-1].item()):] == 0).all(), name
    # S_dmask: (B, H, max_seqlen rounded up to 128) per sequence, sign bit set where a weight was dropped
    padded = [-(-n // 128) * 128 for n in (max_q, max_k)]
    if dropout_p > 0:
        assert S_dmask.shape == (B, H, *padded)
        for b, (nq, nk) in enumerate(lengths):
            assert (S_dmask[b, :, nq:] == 0).all() and (S_dmask[b, :, :, nk:] == 0).all()
        keep = ~torch.signbit(S_dmask)
        options.update(dropout_p=dropout_p)
    else:
        assert S_dmask.numel() == 0
        keep = None
    refs = {}
    for ref_dtype in (torch.float64, dtype):
        ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        ref_out = varlen_reference(*ref_leaves, cu_q, cu_k, dtype=ref_dtype, keep=keep, **options)
        refs[ref_dtype] = (ref_out, *torch.autograd.grad(ref_out, ref_leaves, do.to(ref_dtype), allow_unused=True))
    for name, g, want, low in zip(("out", "dq", "dk", "dv"), got, refs[torch.float64], refs[dtype]):
        want, low = (torch.zeros_like(g, dtype=torch.float64) if t is None else t.nan_to_num() for t in (want, low))
        assert g.shape == want.shape and g.dtype == dtype, name
        err, low_err = max_error(g, want), max_error(low, want)
        assert err <= 2 * low_err + ATOL, f"{name}: error {err:.2e}, the {dtype} reference's {low_err:.2e}"
    # softmax_lse (H, total_q): the natural-log logsumexp of each row, +inf for a row that sees no key
    _, want_lse = varlen_reference(q, k, v, cu_q, cu_k, dtype=torch.float64, return_lse=True,
                                   **{n: o for n, o in options.items() if n != "dropout_p"})
    assert lse.shape == (H, q.shape[0]) and lse.dtype == torch.float32
    want_lse = torch.where(want_lse == float("-inf"), float("inf"), want_lse)
    assert torch.allclose(lse[:, :rows].double(), want_lse, atol=2e-3, rtol=1e-3, equal_nan=False)


VARLEN_OPTIONS = {name: OPTIONS[name] for name in ("window-left", "window-both", "softcap", "alibi-BH", "dropout")}
VARLEN_OPTIONS["none"] = {}
PAIRWISE = pairwise({"option": list(VARLEN_OPTIONS), "lengths": list(LENGTHS), "causal": [False, True],
                     "heads": list(HEADS), "d": [16, 32], "dtype": list(DTYPES)})


@pytest.mark.parametrize("case", PAIRWISE, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_varlen_against_each_sequence(case, device):
    H, Hkv = HEADS[case["heads"]]
    check_varlen(device, DTYPES[case["dtype"]], LENGTHS[case["lengths"]], H, Hkv, case["d"], seed=len(PAIRWISE),
                 causal=case["causal"], **VARLEN_OPTIONS[case["option"]])


def test_alibi_slopes_per_head(device):
    """(H,) slopes, the same for every sequence (the pairwise cases use (B, H))."""
    check_varlen(device, torch.float16, LENGTHS["mixed"], 2, 1, 16, seed=3, causal=True, alibi_slopes="H")


def bnhd(*tensors):
    return [t.transpose(1, 2).contiguous() for t in tensors]


def test_equal_lengths_are_the_dense_batch_bitwise(device):
    """Sequences of one length N packed are flash_attn_func on (B, N, H, d): the same output and
    gradients, bitwise, dropout included: its random numbers are indexed per sequence as per batch
    element, on the (B, H, max_seqlen_q, max_seqlen_k) grid, in the forward and the backward alike."""
    B, N, H, Hkv, d = 3, 21, 4, 2, 16
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(B, N, h, d, generator=g).to(device, torch.bfloat16) for h in (H, Hkv, Hkv))
    options = dict(causal=True, window_size=(7, 2), softcap=3.0)
    dense = [t.clone().requires_grad_() for t in (q, k, v)]
    packed = [t.flatten(0, 1).clone().requires_grad_() for t in (q, k, v)]
    cu = cu_seqlens([N] * B, device)
    torch.manual_seed(0)
    out_dense = flash_attn_func(*dense, 0.3, **options)
    torch.manual_seed(0)
    out_packed = flash_attn_varlen_func(*packed, cu, cu, N, N, 0.3, **options)
    assert torch.equal(out_packed, out_dense.flatten(0, 1))
    do = torch.randn(out_dense.shape, generator=g).to(device, torch.bfloat16)
    grads_packed = torch.autograd.grad(out_packed, packed, do.flatten(0, 1))
    for a, b in zip(grads_packed, torch.autograd.grad(out_dense, dense, do)):
        assert torch.equal(a, b.flatten(0, 1))


def test_packed_functions_and_modules(device):
    """qkvpacked and kvpacked are varlen_func on the unbound tensors; FlashSelfAttention and
    FlashCrossAttention take cu_seqlens (the varlen layout)."""
    lengths = [13, 1, 20]
    cu, N = cu_seqlens(lengths, device), max(lengths)
    qkv = torch.randn(sum(lengths), 3, 4, 16, generator=torch.Generator().manual_seed(2)).to(device, torch.float16)
    options = dict(causal=True, window_size=(5, 0), alibi_slopes=torch.full((4,), 0.1, device=device))
    qkv_leaf = qkv.clone().requires_grad_()
    q_leaf, kv_leaf = qkv[:, 0].clone().requires_grad_(), qkv[:, 1:].clone().requires_grad_()
    plain = flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, cu, N, N, **options)
    packed = flash_attn_varlen_qkvpacked_func(qkv_leaf, cu, N, **options)
    half = flash_attn_varlen_kvpacked_func(q_leaf, kv_leaf, cu, cu, N, N, **options)
    assert torch.equal(packed, plain) and torch.equal(half, plain)
    g = torch.randn_like(plain)
    (dqkv,) = torch.autograd.grad(packed, qkv_leaf, g)
    dq, dkv = torch.autograd.grad(half, (q_leaf, kv_leaf), g)
    assert torch.equal(dqkv[:, 0], dq) and torch.equal(dqkv[:, 1:], dkv)
    self_attn = FlashSelfAttention(causal=True, window_size=(5, 0), alibi_slopes=options["alibi_slopes"]).eval()
    assert torch.equal(self_attn(qkv, cu_seqlens=cu, max_seqlen=N), plain)
    cross = FlashCrossAttention(causal=True, window_size=(5, 0), alibi_slopes=options["alibi_slopes"]).eval()
    assert torch.equal(cross(qkv[:, 0], qkv[:, 1:], cu_seqlens=cu, max_seqlen=N, cu_seqlens_k=cu, max_seqlen_k=N),
                       plain)


def test_paged_keys(device):
    """block_table: each sequence's keys in pages of 8 rows, in shuffled order, among unused pages
    (NaN): the same output as the packed keys, bitwise; no backward."""
    lengths_q, lengths_k, page = [3, 9, 1], [17, 9, 24], 8
    H, Hkv, d = 4, 2, 16
    q, k, v, cu_q, cu_k = packed_inputs(list(zip(lengths_q, lengths_k)), H, Hkv, d, torch.float16, 7, device)
    pages_per_seq = 3
    table = torch.randperm(3 * pages_per_seq + 2, generator=torch.Generator().manual_seed(1))[:9].view(3, 3)
    k_pages = torch.full((3 * pages_per_seq + 2, page, Hkv, d), float("nan"), dtype=k.dtype, device=device)
    v_pages = k_pages.clone()
    for b, n in enumerate(lengths_k):
        rows = torch.arange(n)
        k_pages[table[b, rows // page], rows % page] = k[cu_k[b]:cu_k[b + 1]]
        v_pages[table[b, rows // page], rows % page] = v[cu_k[b]:cu_k[b + 1]]
    table = table.to(device, torch.int32)
    options = dict(causal=True, softcap=2.0)
    want = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 9, 24, **options)
    got = flash_attn_varlen_func(q, k_pages, v_pages, cu_q, cu_k, 9, 24, block_table=table, **options)
    assert torch.equal(got, want) and got[:13].isfinite().all()
    leaf = q.clone().requires_grad_()
    out = flash_attn_varlen_func(leaf, k_pages, v_pages, cu_q, cu_k, 9, 24, block_table=table)
    with pytest.raises(NotImplementedError, match="paged KV cache"):
        out.sum().backward()


def test_unpad_and_pad_input(device):
    """flash-attn's bert_padding helpers: a padded batch to packed rows and back."""
    x = torch.randn(3, 6, 2, 4, device=device, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]], dtype=torch.bool, device=device)
    packed, indices, cu, max_seqlen, used = unpad_input(x, mask)
    assert packed.shape == (10, 2, 4) and cu.tolist() == [0, 3, 9, 10] and max_seqlen == 6
    assert used.tolist() == [3, 6, 1]
    assert cu.dtype == torch.int32 and torch.equal(packed, x[mask])
    back = pad_input(packed, indices, 3, 6)
    assert torch.equal(back, x * mask[..., None, None])
    (grad,) = torch.autograd.grad(back.sum(), x)
    assert torch.equal(grad, mask[..., None, None].expand_as(x).float())


VARLEN_SIGNATURE = [("dropout_p", 0.0), ("softmax_scale", None), ("causal", False), ("window_size", (-1, -1)),
                    ("softcap", 0.0), ("alibi_slopes", None), ("deterministic", False), ("return_attn_probs", False)]
SIGNATURES = {  # flash-attn 2.8: flash_attn/flash_attn_interface.py
    flash_attn_varlen_func: ["q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k",
                             *VARLEN_SIGNATURE, ("block_table", None)],
    flash_attn_varlen_kvpacked_func: ["q", "kv", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k",
                                      *VARLEN_SIGNATURE],
    flash_attn_varlen_qkvpacked_func: ["qkv", "cu_seqlens", "max_seqlen", *VARLEN_SIGNATURE],
}


@pytest.mark.parametrize("fn", list(SIGNATURES), ids=lambda f: f.__name__)
def test_signatures_are_flash_attns(fn):
    want = [(p, None) if isinstance(p, str) else p for p in SIGNATURES[fn]]
    params = inspect.signature(fn).parameters.values()
    assert [(p.name, None if p.default is inspect.Parameter.empty else p.default) for p in params] == want
    assert hasattr(flashcourse, fn.__name__)


@pytest.mark.parametrize("change, error, match", [
    (dict(cu_seqlens_q=[0, 4, 9]), TypeError, "cu_seqlens_q must be an int32 tensor"),
    (dict(cu_seqlens_q=torch.tensor([0, 4, 9])), TypeError, r"convert it with cu_seqlens_q.int\(\)"),
    (dict(cu_seqlens_k=torch.tensor([0, 9], dtype=torch.int32)), ValueError, r"cu_seqlens_k must be .* shape \(3,\)"),
    (dict(cu_seqlens_q=torch.tensor([0, 6, 4], dtype=torch.int32)), ValueError, "never decreasing"),
    (dict(cu_seqlens_k=torch.tensor([1, 4, 9], dtype=torch.int32)), ValueError, "starting at 0"),
    (dict(cu_seqlens_q=torch.tensor([0, 4, 12], dtype=torch.int32)), ValueError, "at most at the 9 packed rows"),
    (dict(max_seqlen_q=4), ValueError, "max_seqlen_q = 4, but cu_seqlens_q has a sequence of 5"),
    (dict(max_seqlen_k=-1), TypeError, "max_seqlen_k must be an int >= 0"),
    (dict(q=torch.randn(1, 9, 2, 8)), ValueError, r"q must be a 3-d tensor \(total_q, H, d\)"),
    (dict(alibi_slopes=torch.ones(3, 2)), ValueError, r"\(B, H\) = \(2, 2\)"),
])
def test_bad_arguments_are_explained(change, error, match, device):
    args = dict(q=torch.randn(9, 2, 8), k=torch.randn(9, 1, 8), v=torch.randn(9, 1, 8),
                cu_seqlens_q=torch.tensor([0, 4, 9], dtype=torch.int32),
                cu_seqlens_k=torch.tensor([0, 4, 9], dtype=torch.int32), max_seqlen_q=5, max_seqlen_k=5)
    args.update(change)
    args = {n: a.to(device, torch.float16) if isinstance(a, torch.Tensor) and a.is_floating_point()
            else a.to(device) if isinstance(a, torch.Tensor) else a for n, a in args.items()}
    with pytest.raises(error, match=match):
        flash_attn_varlen_func(**args)


def test_reference_helper_can_fail(device):
    """The check sees a wrong sequence boundary: the same rows cut elsewhere give other outputs."""
    q, k, v, cu_q, cu_k = packed_inputs(LENGTHS["mixed"], 2, 1, 16, torch.float32, 0, device)
    out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 30, 40)
    shifted = cu_k.clone()
    shifted[1] += 1
    assert max_error(out[:cu_q[-1]], varlen_reference(q, k, v, cu_q, shifted, dtype=torch.float64)[:cu_q[-1]]) > 0.01
    assert max_error(out[:cu_q[-1]], reference_attention(  # all rows as one sequence: wrong too
        q[None, :cu_q[-1]].transpose(1, 2), k[None, :cu_k[-1]].transpose(1, 2), v[None, :cu_k[-1]].transpose(1, 2))
        [0].transpose(0, 1)) > 0.01


def test_torch_compile_traces_varlen_without_a_graph_break(device):
    """The packed layout travels through the custom operators: fullgraph compiles, dropout included,
    and gives eager's output and gradients (the same generator state, the same mask)."""
    def block(q, k, v, cu, slopes):
        out = flash_attn_varlen_func(q * 2, k, v, cu, cu, 9, 9, 0.1, causal=True, window_size=(3, 0), softcap=2.0,
                                     alibi_slopes=slopes)
        return out.relu().sum(-1)

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(14, h, 16, generator=g).to(device).requires_grad_() for h in (2, 1, 1))
    cu, slopes = cu_seqlens([5, 9], device), torch.rand(2, 2, generator=g).to(device)
    torch.manual_seed(0)
    got = compiled(q, k, v, cu, slopes)
    torch.manual_seed(0)
    want = block(q, k, v, cu, slopes)
    assert torch.equal(got, want)
    for a, b in zip(torch.autograd.grad(got.sum(), (q, k, v)), torch.autograd.grad(want.sum(), (q, k, v))):
        assert torch.equal(a, b)
