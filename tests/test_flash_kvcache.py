"""flash-attn's ``flash_attn_with_kvcache``: the in-place append, rotary embeddings, cache rows, left
padding, paged caches, split-KV decoding and its merge, against a plain PyTorch model of the cache.

The model (``kvcache_reference``) gathers each sequence's cache, writes the new keys (turned by the
rotary embedding, computed as complex multiplication) and values at cache_seqlens, turns q, and runs
``naive_attention`` on each sequence's keys leftpad .. cache_seqlens + N_new − 1, in float64 and in
the inputs' precision (flash-attn's accuracy rule). The caches after the call must hold exactly the
model's: the new rows appended in place, every other element unchanged.
"""

import inspect

import pytest
import torch

import flashcourse
from flashcourse import flash_attn_with_kvcache, naive_attention
from flashcourse.flash_attn_interface import CacheError
from flashcourse.kernels.forward import attention_forward
from flashcourse.kernels.splitkv import merge_splits, num_splits_heuristic
from flashcourse.softmax import SoftmaxState, empty_state, finalize, merge_states
from flash_reference import max_error
from test_flash_options import ATOL, HEADS, pairwise

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
CAPACITY, PAGE = 48, 8  # keys a sequence's cache holds; rows of a page (a paged cache: 6 pages per sequence)


def rotate(x, cos, sin, positions, interleaved):
    """x (B, N, H, d) turned at ``positions`` (B, N), in float64: each pair of its first 2 · cos.shape[1]
    features as a complex number, times cos θ + i sin θ of the position's row."""
    half = cos.shape[1]
    xr = x[..., :2 * half].double()
    pairs = xr.unflatten(-1, (half, 2)) if interleaved else torch.stack((xr[..., :half], xr[..., half:]), dim=-1)
    turned = torch.view_as_real(torch.view_as_complex(pairs.contiguous()) * torch.complex(
        cos[positions].double(), sin[positions].double())[:, :, None])
    y = turned.flatten(-2) if interleaved else torch.cat((turned[..., 0], turned[..., 1]), dim=-1)
    return torch.cat((y, x[..., 2 * half:].double()), dim=-1)


def sequence_caches(cache, batch_idx, block_table, B):
    """Each sequence's cache (B, capacity, Hkv, d): its row, its pages in order, or row b."""
    if block_table is not None:
        return cache[block_table.long()].flatten(1, 2)
    return cache[batch_idx.long()] if batch_idx is not None else cache[:B]


def kvcache_reference(q, k_cache, v_cache, k, v, *, cache_seqlens, cos=None, sin=None, interleaved=True,
                      cache_batch_idx=None, cache_leftpad=None, block_table=None, causal=False, window_size=(-1, -1),
                      softcap=0.0, alibi_slopes=None):
    """(out in float64, out in q's dtype, each sequence's K and V cache after the append (B, capacity, Hkv, d))."""
    B, Nq = q.shape[:2]
    ks, vs = (sequence_caches(c, cache_batch_idx, block_table, B).clone() for c in (k_cache, v_cache))
    Nnew = 0 if k is None else k.shape[1]
    positions = cache_seqlens.long()[:, None] + torch.arange(Nnew, device=q.device)
    if k is not None:
        k_new = k if cos is None else rotate(k, cos, sin, positions, interleaved).to(k.dtype)
        for b in range(B):
            ks[b, positions[b]], vs[b, positions[b]] = k_new[b], v[b]
    if cos is not None:
        steps = torch.arange(Nq, device=q.device) if causal or window_size != (-1, -1) else torch.zeros(
            Nq, dtype=torch.long, device=q.device)
        q = rotate(q, cos, sin, cache_seqlens.long()[:, None] + steps, interleaved).to(q.dtype)
    outs = {torch.float64: [], q.dtype: []}
    for b in range(B):
        start = 0 if cache_leftpad is None else int(cache_leftpad[b])
        end = int(cache_seqlens[b]) + Nnew
        slopes = None if alibi_slopes is None else alibi_slopes[b]
        for dtype in outs:
            if end == start:
                outs[dtype].append(torch.zeros(q.shape[1:], dtype=dtype, device=q.device))
                continue
            qb, kb, vb = (t[None].transpose(1, 2).to(dtype) for t in (q[b], ks[b, start:end], vs[b, start:end]))
            o = naive_attention(qb, kb, vb, causal=causal, window_size=window_size, softcap=softcap,
                                alibi_slopes=slopes, upcast=False)
            outs[dtype].append(o[0].transpose(0, 1))
    return torch.stack(outs[torch.float64]), torch.stack(outs[q.dtype]), ks, vs


def kvcache_inputs(device, dtype, *, B, Nq, Nnew, H, Hkv, d, cache, rotary, seed, capacity=CAPACITY, page=PAGE):
    """q, caches, new k and v, cache_seqlens and the cache arguments of one case; the caches hold
    random numbers everywhere (rows past cache_seqlens too: they must stay hidden). Sequence 0's cache
    is full after the append; a paged cache has ``capacity / page`` pages per sequence, and 3 unused."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    args = dict(cache_seqlens=torch.randint(0 if Nnew else 1, capacity - max(Nq, Nnew) + 1, (B,), generator=g))
    args["cache_seqlens"][0] = capacity - max(Nq, Nnew)  # one full cache
    if cache == "paged":
        pages = capacity // page
        k_cache, v_cache = randn(B * pages + 3, page, Hkv, d), randn(B * pages + 3, page, Hkv, d)
        args["block_table"] = torch.randperm(B * pages + 3, generator=g)[:B * pages].view(B, pages)
    else:
        rows = B + 2 if cache == "batch_idx" else B
        k_cache, v_cache = randn(rows, capacity, Hkv, d), randn(rows, capacity, Hkv, d)
        if cache == "batch_idx":
            args["cache_batch_idx"] = torch.randperm(rows, generator=g)[:B]
        if cache == "leftpad":
            args["cache_leftpad"] = (torch.rand(B, generator=g) * args["cache_seqlens"]).long()
    if rotary != "none" and Nnew:
        rotary_dim = d if rotary.endswith("full") else d // 2
        angle = torch.rand(capacity, rotary_dim // 2, generator=g, dtype=torch.float64) * 6.283
        args.update(rotary_cos=torch.cos(angle).to(device, dtype), rotary_sin=torch.sin(angle).to(device, dtype),
                    rotary_interleaved=rotary.startswith("interleaved"))
    args = {n: a.to(device, torch.int32) if n in ("cache_seqlens", "block_table", "cache_batch_idx", "cache_leftpad")
            else a for n, a in args.items()}
    k, v = (randn(B, Nnew, Hkv, d), randn(B, Nnew, Hkv, d)) if Nnew else (None, None)
    return randn(B, Nq, H, d), k_cache, v_cache, k, v, args


def check_kvcache(device, dtype, *, B=2, Nq=1, Nnew=1, H=4, Hkv=2, d=16, cache="plain", rotary="none", seed=0,
                  num_splits=0, capacity=CAPACITY, page=PAGE, **options):
    """flash_attn_with_kvcache against the model: out with flash-attn's accuracy rule, lse's shape, the caches."""
    q, k_cache, v_cache, k, v, args = kvcache_inputs(device, dtype, B=B, Nq=Nq, Nnew=Nnew, H=H, Hkv=Hkv, d=d,
                                                     cache=cache, rotary=rotary, seed=seed, capacity=capacity,
                                                     page=page)
    if options.get("alibi_slopes") is not None:
        options["alibi_slopes"] = (torch.rand(B, H, generator=torch.Generator().manual_seed(seed)) * 0.3 + 0.05).to(
            device)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, num_splits=num_splits, return_softmax_lse=True,
                                       **args, **options)
    ref_args = {("interleaved" if n == "rotary_interleaved" else n.replace("rotary_", "")): a for n, a in args.items()}
    want, low, ks, vs = kvcache_reference(q, k_before, v_before, k, v, **ref_args, **options)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    err, low_err = max_error(out, want), max_error(low, want)
    assert err <= 2 * low_err + ATOL, f"error {err:.2e}, the {dtype} reference's {low_err:.2e}"
    assert lse.shape == (B, H, Nq) and lse.dtype == torch.float32 and not lse.isnan().any()
    # the caches: the new rows appended in place, k turned (rounded once, as the model), nothing else changed
    got_k, got_v = (sequence_caches(c, args.get("cache_batch_idx"), args.get("block_table"), B)
                    for c in (k_cache, v_cache))
    assert torch.allclose(got_k.double(), ks.double(), rtol=2**-7, atol=1e-3) and torch.equal(got_v, vs)
    touched = torch.zeros(k_cache.shape[:2], dtype=torch.bool, device=device)
    if Nnew:
        rows = args["cache_seqlens"].long()[:, None] + torch.arange(Nnew, device=device)
        if "block_table" in args:
            touched[torch.gather(args["block_table"].long(), 1, rows // page), rows % page] = True
        else:
            which = args.get("cache_batch_idx", torch.arange(B, device=device)).long()
            touched[which[:, None], rows] = True
    assert torch.equal(k_cache[~touched], k_before[~touched]) and torch.equal(v_cache[~touched], v_before[~touched])
    assert Nnew == 0 or not torch.equal(v_cache, v_before)
    return out, lse


MASKS = {"none": {}, "causal": dict(causal=True), "window": dict(window_size=(9, 2)),
         "alibi": dict(alibi_slopes=True, causal=True), "softcap": dict(softcap=2.0)}
PAIRWISE = pairwise({
    "cache": ["plain", "batch_idx", "leftpad", "paged"], "mask": list(MASKS),
    "rotary": ["none", "interleaved-half", "neox-full"], "shape": ["1q-1new", "3q-3new", "3q-1new", "1q-0new"],
    "heads": list(HEADS), "num_splits": [0, 1, 3], "dtype": list(DTYPES),
})


@pytest.mark.parametrize("case", PAIRWISE, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_kvcache_against_the_model(case, device):
    H, Hkv = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}[case["heads"]]
    Nq, Nnew = (int(part[:-len(unit)]) for part, unit in zip(case["shape"].split("-"), ("q", "new")))
    check_kvcache(device, DTYPES[case["dtype"]], Nq=Nq, Nnew=Nnew, H=H, Hkv=Hkv, d=16 if H == 4 else 32,
                  cache=case["cache"], rotary=case["rotary"], num_splits=case["num_splits"], seed=len(PAIRWISE),
                  **MASKS[case["mask"]])


def test_cache_seqlens_as_an_int_and_no_cache_seqlens(device):
    """An int is every sequence's length; None attends over the whole cache (nothing appended)."""
    q, k_cache, v_cache, _, _, _ = kvcache_inputs(device, torch.float16, B=2, Nq=2, Nnew=0, H=4, Hkv=2, d=16,
                                                  cache="plain", rotary="none", seed=1)
    as_int = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=30, causal=True)
    as_tensor = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=torch.full((2,), 30, dtype=torch.int32,
                                                                                      device=device), causal=True)
    whole = flash_attn_with_kvcache(q, k_cache, v_cache, causal=True)
    everything = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=CAPACITY, causal=True)
    assert torch.equal(as_int, as_tensor) and torch.equal(whole, everything) and not torch.equal(whole, as_int)


@pytest.mark.parametrize("Nk", [1, 47, 100])
def test_splits_give_the_unsplit_result(Nk, device):
    """Any number of splits (more than key blocks too: empty splits) merges to the unsplit (O, L)."""
    g = torch.Generator().manual_seed(Nk)
    q, k, v = (torch.randn(2, h, n, 16, generator=g).to(device) for h, n in ((4, 3), (2, Nk), (2, Nk)))
    base = attention_forward(q, k, v, causal=True, scale=0.25, decode=True)
    for splits in (2, 3, 9):
        o, lse = attention_forward(q, k, v, causal=True, scale=0.25, decode=True, num_splits=splits)
        assert max_error(o, base[0]) < 1e-5 and torch.allclose(lse, base[1], atol=1e-5)  # −inf where no key


def test_merge_is_chapter_02s_merge_states(device):
    """The merge kernel on random partial states, empty ones (L = −inf) among them, is merge_states
    folded over the splits (each split the state (m, l, o) = (L_s, 1, O_s))."""
    g = torch.Generator().manual_seed(0)
    S, B, H, N, d = 4, 2, 3, 5, 24
    o_parts = torch.randn(S, B, H, N, d, generator=g)
    lse_parts = torch.randn(S, B, H, N, generator=g) * 3
    lse_parts[1, 0] = float("-inf")
    o_parts[1, 0] = 0.0
    lse_parts[:, 1, 2, 4] = float("-inf")  # a row no split saw a key of
    o_parts[:, 1, 2, 4] = 0.0
    state = empty_state((B, H, N), d=d)
    for s in range(S):
        state = merge_states(state, SoftmaxState(lse_parts[s], (lse_parts[s] > float("-inf")).float(), o_parts[s]))
    want_o, want_lse = finalize(state)
    out, lse = torch.empty(B, H, N, d, device=device), torch.empty(B, H, N, device=device)
    merge_splits(o_parts.to(device), lse_parts.to(device), out, lse)
    assert max_error(out, want_o) < 1e-5 and torch.allclose(lse.cpu(), want_lse, atol=1e-5)
    assert (out[1, 2, 4] == 0).all() and lse[1, 2, 4] == float("-inf")


def test_num_splits_heuristic_is_flash_attns():
    """flash-attn's examples: 48 programs on 108 SMs split in 2 (efficiency 0.89); enough programs,
    or one key block, are not split; eligible counts only (64 blocks: 11 splits are 12's)."""
    assert num_splits_heuristic(48, 108, 64) == 2
    assert num_splits_heuristic(100, 108, 64) == 1 and num_splits_heuristic(8, 264, 1) == 1
    # decoding, B · Hkv = 8 programs on an H100 (2 · 132 slots), 8k keys in blocks of 128: 32 splits of 2 blocks
    assert num_splits_heuristic(8, 264, 64) == 32


def test_query_heads_of_a_group_become_rows(device, monkeypatch):
    """One query, grouped heads, no window: the H / Hkv heads of a group are the rows of one program
    ((B, Hkv, H / Hkv, d) reaches the kernel), with the same result as a head per program."""
    seen = []
    real = attention_forward
    monkeypatch.setattr("flashcourse.flash_attn_interface.attention_forward",
                        lambda q, *a, **kw: seen.append(tuple(q.shape)) or real(q, *a, **kw))
    out, _ = check_kvcache(device, torch.float16, Nq=1, Nnew=1, H=6, Hkv=2, d=16, causal=True)
    assert seen == [(2, 2, 3, 16)]
    alibi, _ = check_kvcache(device, torch.float16, Nq=1, Nnew=1, H=6, Hkv=2, d=16, alibi_slopes=True)
    assert seen[-1] == (2, 6, 1, 16)


def test_signature_is_flash_attns():
    want = ["q", "k_cache", "v_cache", ("k", None), ("v", None), ("rotary_cos", None), ("rotary_sin", None),
            ("cache_seqlens", None), ("cache_batch_idx", None), ("cache_leftpad", None), ("block_table", None),
            ("softmax_scale", None), ("causal", False), ("window_size", (-1, -1)), ("softcap", 0.0),
            ("rotary_interleaved", True), ("alibi_slopes", None), ("num_splits", 0), ("return_softmax_lse", False)]
    params = inspect.signature(flash_attn_with_kvcache).parameters.values()
    assert [(p.name, None if p.default is inspect.Parameter.empty else p.default) for p in params] == [
        (w, None) if isinstance(w, str) else w for w in want]
    assert flashcourse.flash_attn_with_kvcache is flash_attn_with_kvcache


def _small(device):
    q = torch.randn(1, 1, 2, 16, dtype=torch.float16).to(device)
    cache = torch.randn(4, 8, 2, 16, dtype=torch.float16).to(device)
    new = torch.randn(1, 1, 2, 16, dtype=torch.float16).to(device)
    return q, cache, cache.clone(), new


def test_caches_too_small_are_refused(device):
    """Like flash-attn (a RuntimeError matching "block_table"; here also a ValueError): the sequences
    must fit the pages the block table gives them, and the appended keys the cache."""
    q, k_cache, v_cache, new = _small(device)
    table = torch.zeros(1, 1, dtype=torch.int32, device=device)
    with pytest.raises(RuntimeError, match="block_table"):
        flash_attn_with_kvcache(q, k_cache, v_cache, new, new, cache_seqlens=8, block_table=table)
    with pytest.raises(CacheError, match="block_table"):
        flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=9, block_table=table)
    assert flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=8, block_table=table).isfinite().all()
    with pytest.raises(ValueError, match="do not fit in k_cache's 8 rows"):
        flash_attn_with_kvcache(q, k_cache, v_cache, new, new, cache_seqlens=8)


@pytest.mark.parametrize("change, error, match", [
    (dict(cache_seqlens=None), ValueError, "to append k and v, pass cache_seqlens"),
    (dict(v=None), ValueError, "pass the new k and v together"),
    (dict(k=None, v=None, rotary_cos=torch.ones(8, 4), rotary_sin=torch.zeros(8, 4)), ValueError,
     "rotary embeddings turn the new k and q"),
    (dict(rotary_cos=torch.ones(6, 4), rotary_sin=torch.zeros(6, 4)), ValueError, "fewer than the 8 of the KV cache"),
    (dict(rotary_cos=torch.ones(8, 12), rotary_sin=torch.zeros(8, 12)), ValueError, "rotary_dim <= d = 16"),
    (dict(cache_seqlens=torch.tensor([3])), TypeError, "cache_seqlens must be an int32 tensor"),
    (dict(cache_batch_idx=torch.tensor([7], dtype=torch.int32)), CacheError, "outside the 4 rows of k_cache"),
    (dict(block_table=torch.zeros(1, 2, dtype=torch.int32), cache_batch_idx=torch.zeros(1, dtype=torch.int32)),
     ValueError, "takes no cache_batch_idx"),
    (dict(k_cache=torch.randn(4, 8, 2, 16)), TypeError, "k_cache is torch.float32"),
    (dict(num_splits=-1), ValueError, "num_splits must be an int >= 0"),
])
def test_bad_arguments_are_explained(change, error, match, device):
    q, k_cache, v_cache, new = _small(device)
    args = dict(q=q, k_cache=k_cache, v_cache=v_cache, k=new, v=new, cache_seqlens=3)
    args.update({n: a.to(device) if isinstance(a, torch.Tensor) and n != "k_cache" else a for n, a in change.items()})
    if "rotary_cos" in change:
        args.update(rotary_cos=args["rotary_cos"].half(), rotary_sin=args["rotary_sin"].half())
    if "k_cache" in change:
        args["k_cache"] = change["k_cache"].to(device)
    with pytest.raises(error, match=match):
        flash_attn_with_kvcache(**args)
