"""Wrong submissions lose points: each mutant is a solution with one classic bug, or a shortcut the
exercise forbids, made by a text edit of solutions/ (so it follows the solutions as they change).

Most run in this process (``isolate=False``, fast); the reads past the end of an input need the
worker's guard pages and run in a worker process.
"""

import pytest
import torch

from grading_helpers import body, edit, first_miss, solution, submit

ONLINE_TWO_PASS = """
    m = torch.full(x.shape[:-1], float("-inf"), dtype=x.dtype)
    for start in range(0, x.shape[-1], block):
        m = torch.maximum(m, x[..., start : start + block].amax(dim=-1))
    m_safe = torch.where(torch.isneginf(m), 0.0, m)
    l = torch.zeros(x.shape[:-1], dtype=x.dtype)
    for start in range(0, x.shape[-1], block):
        l = l + torch.exp(x[..., start : start + block] - m_safe[..., None]).sum(dim=-1)
    return torch.where(l[..., None] > 0, torch.exp(x - m_safe[..., None]) / l[..., None], 0.0)
"""
ONLINE_SUM_AT_THE_END = """
    m = torch.full(x.shape[:-1], float("-inf"), dtype=x.dtype)
    for start in range(0, x.shape[-1], block):
        m = torch.maximum(m, x[..., start : start + block].amax(dim=-1))
    e = torch.exp(x - torch.where(torch.isneginf(m), 0.0, m)[..., None])
    l = e.sum(dim=-1, keepdim=True)
    return torch.where(l > 0, e / l, 0.0)
"""
MHA_SDPA = """
    H, Hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
    q, k, v = self.qkv_proj(x).split([H * d, Hkv * d, Hkv * d], dim=-1)
    o = torch.nn.functional.scaled_dot_product_attention(split_heads(q, H), split_heads(k, Hkv), split_heads(v, Hkv),
                                                         is_causal=self.causal, enable_gqa=True)
    return self.out_proj(merge_heads(o))
"""
FWD_IN_TORCH = """require_implemented(attention_fwd_kernel)
    s = (1.0 / math.sqrt(q.shape[-1]) if scale is None else scale) * q.float() @ k.float().transpose(-2, -1)
    return torch.softmax(s, dim=-1).to(q.dtype) @ v, torch.logsumexp(s, dim=-1)
"""
K_UNMASKED = "k = tl.load(K + bh * Nk * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :])"
NAIVE_BY_AUTOGRAD = """
Q, K, V = (t.detach().float().requires_grad_() for t in (q, k, v))
with torch.enable_grad():
    S = (1.0 / math.sqrt(q.shape[-1]) if scale is None else scale) * (Q @ K.transpose(-2, -1))
    if causal:
        S = S.masked_fill(torch.arange(k.shape[2]) > torch.arange(q.shape[2])[:, None] + k.shape[2] - q.shape[2], float("-inf"))
    O = torch.softmax(S, dim=-1).nan_to_num(0.0) @ V
    dQ, dK, dV = torch.autograd.grad(O, (Q, K, V), do.float())
return dQ.to(q.dtype), dK.to(k.dtype), dV.to(v.dtype)
"""
MHA_BY_HAND = """
H, Hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
q, k, v = self.qkv_proj(x).split([H * d, Hkv * d, Hkv * d], dim=-1)
q, k, v = split_heads(q, H), split_heads(k, Hkv), split_heads(v, Hkv)
self.attention(q, k, v, causal=self.causal)  # called, and ignored
k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
S = 0.5 * q @ k.transpose(-2, -1)  # the scale the grader once used
if self.causal:
    S = S.masked_fill(torch.ones(S.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
return self.out_proj(merge_heads(torch.softmax(S, dim=-1) @ v))
"""
GLOBAL_MASK = "full = torch.arange(Nk)[None, :] > torch.arange(Nq)[:, None] + (Nk - Nq)\n"
WINDOW_LO = "        lo = tl.maximum(start_m + offset - WINDOW_LEFT, 0) // BLOCK_N * BLOCK_N"
WINDOW_HI = "        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + offset + WINDOW_RIGHT, 0), Nk)"

# (file, exercise, the bug, edit: (old, new) or ("body", function, code), words of the message or None)
MUTANTS = [
    # classic bugs
    ("ch01_naive", "causal_mask", "causal mask off by one", ("return j <= i + (Nk - Nq)", "return j < i + (Nk - Nq)"), None),
    ("ch01_naive", "causal_mask", "causal mask top-left aligned", ("return j <= i + (Nk - Nq)", "return j <= i"), None),
    ("ch01_naive", "causal_mask", "an int32 mask", ("return j <= i + (Nk - Nq)", "return (j <= i + (Nk - Nq)).int()"),
     "dtype torch.int32"),
    ("ch01_naive", "naive_attention", "scale applied twice", ("S = scale * (Q @ K", "S = scale * scale * (Q @ K"), None),
    ("ch01_naive", "naive_attention", "softmax over the wrong dim", ("torch.softmax(S, dim=-1).nan", "torch.softmax(S, dim=-2).nan"), None),
    ("ch01_naive", "naive_attention", "float16 without upcasting", ("Q, K, V = q.float(), k.float(), v.float()", "Q, K, V = q, k, v"),
     "large logits"),
    ("ch01_naive", "naive_attention", "scale argument ignored", ("    if scale is None:\n        scale = 1.0 / math.sqrt(q.shape[-1])\n    Q, K",
                                                                 "    scale = 1.0 / math.sqrt(q.shape[-1])\n    Q, K"), "scale=0.3"),
    ("ch01_naive", "naive_attention", "q scaled in place (right values)", ("S = scale * (Q @ K.transpose(-2, -1))",
                                                                           "S = Q.mul_(scale) @ K.transpose(-2, -1)"),
     "changed its input q in place"),
    ("ch01_naive", "naive_attention", "q scaled in place and again", ("S = scale * (Q @ K.transpose(-2, -1))",
                                                                      "Q *= scale\n    S = scale * (Q @ K.transpose(-2, -1))"), None),
    ("ch02_softmax", "safe_softmax", "missing max subtraction", ("e = torch.exp(x - m)", "e = torch.exp(x)"), None),
    ("ch02_softmax", "online_softmax", "running sum not rescaled", ("l = l * torch.exp(m - m_safe) + ", "l = l + "),
     "several blocks"),
    ("ch02_softmax", "online_softmax", "two passes: every block's max first", ("body", "online_softmax", ONLINE_TWO_PASS),
     "two passes"),
    ("ch02_softmax", "online_softmax", "max by blocks, then one sum over the row", ("body", "online_softmax", ONLINE_SUM_AT_THE_END),
     "two passes"),
    ("ch02_softmax", "online_softmax", "not online: the row max first",
     ("    for start in range(0, x.shape[-1], block):\n", "    m = x.amax(dim=-1)\n    for start in range(0, x.shape[-1], block):\n"), "at once"),
    ("ch02_softmax", "merge_states", "o not rescaled", ("alpha[..., None] * a.o + beta[..., None] * b.o", "a.o + b.o"), None),
    ("ch02_softmax", "merge_states", "NaN for empty states", ("m_safe = torch.where(torch.isneginf(m), 0.0, m)\n    # α",
                                                              "m_safe = m\n    # α"), None),
    ("ch03_tiling", "tiled_attention_forward", "accumulator not rescaled",
     ("O_i = alpha[..., None] * O_i + P_ij @ V_j", "O_i = O_i + P_ij @ V_j"), None),
    ("ch03_tiling", "tiled_attention_forward", "logsumexp without the max", ("m_i + torch.log(l_i)", "torch.log(l_i)"), None),
    ("ch03_tiling", "tiled_attention_forward", "causal mask off by one", ("cols[None, :] > rows[:, None]", "cols[None, :] >= rows[:, None]"), None),
    ("ch03_tiling", "tiled_attention_forward", "no final division by l", ("O_i / l_i[..., None], 0.0", "O_i, 0.0"), None),
    ("ch03_tiling", "tiled_attention_forward", "scale argument ignored",
     ("    if scale is None:\n        scale = 1.0 / math.sqrt(d)\n", "    scale = 1.0 / math.sqrt(d)\n"), "scale=0.3"),
    ("ch03_tiling", "tiled_attention_forward", "the whole score matrix at once",
     ("for i0 in range(0, Nq, block_m):", "block_m, block_n = Nq, Nk\n    for i0 in range(0, Nq, block_m):"), "score"),
    ("ch03_tiling", "tiled_attention_forward", "(B_r × Nk) strips",
     ("for i0 in range(0, Nq, block_m):", "block_n = Nk\n    for i0 in range(0, Nq, block_m):"), "12 queries × 45 keys"),
    ("ch03_tiling", "tiled_attention_forward", "(Nq × B_c) strips",
     ("for i0 in range(0, Nq, block_m):", "block_m = Nq\n    for i0 in range(0, Nq, block_m):"), "70 queries × 7 keys"),
    ("ch03_tiling", "tiled_attention_forward", "the transposed (Nk × Nq) matrix",
     ("for i0 in range(0, Nq, block_m):", "ST = K @ Q.transpose(-2, -1)\n    for i0 in range(0, Nq, block_m):"), "whole"),
    ("ch03_tiling", "tiled_attention_forward", "block sizes swapped",
     ("    B, H, Nq, d = q.shape\n", "    B, H, Nq, d = q.shape\n    block_m, block_n = block_n, block_m\n"), "swap"),
    ("ch03_tiling", "tiled_attention_forward", "O from PyTorch's SDPA, L from the tiles",
     ("return O.to(q.dtype), L", "return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale).to(q.dtype), L"),
     "scaled_dot_product"),
    ("ch04_triton_primer", "softmax_kernel", "padding loaded as 0, not −inf",
     ('mask=mask, other=float("-inf")).to(tl.float32)', "mask=mask, other=0.0).to(tl.float32)"), None),
    ("ch04_triton_primer", "matmul_kernel", "b's column stride ignored", ("offs_n[None, :] * stride_bn,", "offs_n[None, :],"), None),
    ("ch04_triton_primer", "matmul_kernel", "a's column stride ignored", ("offs_k[None, :] * stride_ak,", "offs_k[None, :],"),
     "transposed"),
    ("ch05_triton_forward", "attention_fwd_kernel", "accumulator not rescaled", ("acc = alpha[:, None] * acc + tl.dot", "acc = acc + tl.dot"), None),
    ("ch05_triton_forward", "attention_fwd_kernel", "logsumexp left in base 2", ("(m_i + tl.math.log2(l_safe)) * LN_2", "(m_i + tl.math.log2(l_safe))"), None),
    ("ch05_triton_forward", "attention_fwd_kernel", "causal mask off by one",
     ("visible & (offs_n[None, :] <= offs_m[:, None] + Nk - Nq)", "visible & (offs_n[None, :] < offs_m[:, None] + Nk - Nq)"), None),
    ("ch05_triton_forward", "attention_fwd_kernel", "the kernel ignores its scale", ("qk_scale = scale * LOG2_E", "qk_scale = HEAD_DIM ** -0.5 * LOG2_E"),
     "scale=0.3"),
    ("ch06_backward", "naive_backward", "dS without D", ("dS = P * (dP - backward_delta(o, do)[..., None])", "dS = P * dP"), None),
    ("ch06_backward", "naive_backward", "scale applied to dV too", ("dV = P.transpose(-2, -1) @ dO", "dV = scale * P.transpose(-2, -1) @ dO"), None),
    ("ch06_backward", "naive_backward", "float32 gradients for float16 inputs",
     ("return dQ.to(q.dtype), dK.to(k.dtype), dV.to(v.dtype)\n    ### END SOLUTION\n\n\ndef tiled",
      "return dQ, dK, dV\n    ### END SOLUTION\n\n\ndef tiled"), "dtype torch.float32, expected torch.float16"),
    ("ch06_backward", "tiled_backward", "L = −inf rows not guarded", ("L = torch.where(torch.isneginf(lse), 0.0, lse.float())", "L = lse.float()"), None),
    ("ch06_backward", "tiled_backward", "dK_j overwritten, not accumulated", ("dK[:, :, j0 : j0 + block_n] += ", "dK[:, :, j0 : j0 + block_n] = "), None),
    ("ch06_backward", "tiled_backward", "the whole score matrix at once",
     ("for j0 in range(0, Nk, block_n):", "block_m, block_n = Nq, Nk\n    for j0 in range(0, Nk, block_n):"), "score"),
    ("ch06_backward", "tiled_backward", "(Nq × B_c) strips",
     ("for j0 in range(0, Nk, block_n):", "block_m = Nq\n    for j0 in range(0, Nk, block_n):"), "70 queries × 7 keys"),
    ("ch07_triton_backward", "dkdv_kernel", "dK not scaled", ("dk = dk * scale", "dk = dk"), None),
    ("ch07_triton_backward", "dq_kernel", "dS without D", ("ds = p * (tl.dot(do, tl.trans(v)) - D_i[:, None])", "ds = p * tl.dot(do, tl.trans(v))"), None),
    ("ch07_triton_backward", "dq_kernel", "the kernel ignores its scale",
     ("s = tl.dot(q, tl.trans(k)) * scale", "s = tl.dot(q, tl.trans(k)) * HEAD_DIM ** -0.5"), "scale=0.3"),
    ("ch08_module", "MultiHeadAttention.forward", "causal flag dropped", (", causal=self.causal)", ")"), None),
    ("ch08_module", "split_heads", "heads split without the transpose", (".transpose(1, 2)\n", ".reshape(B, num_heads, N, -1)\n"), None),
    # calling the package's implementation of the idea, or not routing through the exercise
    ("ch01_naive", "naive_attention", "calls flashcourse.naive_attention",
     ("body", "naive_attention", "import flashcourse\nreturn flashcourse.naive_attention(q, k, v, causal=causal, scale=scale)"),
     "calls flashcourse.reference.naive_attention"),
    ("ch02_softmax", "safe_softmax", "calls flashcourse.safe_softmax",
     ("body", "safe_softmax", "import flashcourse\nreturn flashcourse.safe_softmax(x)"), "calls flashcourse.softmax.safe_softmax"),
    ("ch02_softmax", "online_softmax", "calls flashcourse.online_softmax",
     ("body", "online_softmax", "from flashcourse.softmax import online_softmax as theirs\nreturn theirs(x, block=block)"),
     "calls flashcourse.softmax.online_softmax"),
    ("ch02_softmax", "online_softmax", "calls flashcourse.online_softmax, but not on the first call",
     ("    m = torch.full(x.shape[:-1], float(\"-inf\"), dtype=x.dtype)\n    l = torch.zeros",
      "    if x.shape[-1] > 40:\n        from flashcourse.softmax import online_softmax as theirs\n"
      "        return theirs(x, block=block)\n    m = torch.full(x.shape[:-1], float(\"-inf\"), dtype=x.dtype)\n    l = torch.zeros"),
     "calls flashcourse.softmax.online_softmax"),
    ("ch02_softmax", "merge_states", "calls flashcourse.merge_states",
     ("body", "merge_states", "import flashcourse\nreturn flashcourse.merge_states(a, b)"), "calls flashcourse.softmax.merge_states"),
    ("ch03_tiling", "tiled_attention_forward", "calls flashcourse.tiled_attention_forward",
     ("body", "tiled_attention_forward", "from flashcourse import tiled_attention_forward as theirs\n"
                                         "return theirs(q, k, v, causal=causal, scale=scale, block_m=block_m, block_n=block_n)"),
     "calls flashcourse.tiled.tiled_attention_forward"),
    ("ch06_backward", "tiled_backward", "calls flashcourse.tiled_attention_backward",
     ("body", "tiled_backward", "from flashcourse import tiled_attention_backward as theirs\n"
                                "return theirs(q, k, v, o, lse, do, causal=causal, scale=scale)"), "calls flashcourse.tiled"),
    ("ch05_triton_forward", "attention_fwd_kernel", "the launcher calls flashcourse's kernel",
     ("require_implemented(attention_fwd_kernel)\n",
      "from flashcourse.kernels.forward import attention_forward\n"
      "    return attention_forward(q, k, v, causal=causal, scale=1 / math.sqrt(q.shape[-1]) if scale is None else scale)\n"),
     "calls flashcourse.kernels.forward"),
    ("ch05_triton_forward", "attention_fwd_kernel", "the launcher computes in torch", ("require_implemented(attention_fwd_kernel)\n", FWD_IN_TORCH),
     "computed with torch"),
    ("ch07_triton_backward", "dq_kernel", "the launcher calls flashcourse's backward",
     ("    require_implemented(dq_kernel)\n",
      "    from flashcourse.kernels.backward import attention_backward\n"
      "    return attention_backward(q, k, v, o, lse, do, causal=causal, scale=1 / math.sqrt(q.shape[-1]) if scale is None else scale)[0]\n"),
     "calls flashcourse.kernels.backward"),
    ("ch08_module", "MultiHeadAttention.forward", "SDPA instead of self.attention", ("body", "forward", MHA_SDPA), "self.attention"),
    ("ch08_module", "MultiHeadAttention.forward", "flashcourse.flash_attention instead of self.attention",
     ("o = self.attention(", "o = flashcourse.flash_attention("), "calls flashcourse.ops.flash_attention"),
    # a library's implementation of the exercise's idea
    ("ch02_softmax", "safe_softmax", "torch.softmax", ("body", "safe_softmax", "return torch.softmax(x, dim=-1).nan_to_num(0.0)"),
     "calls torch.softmax"),
    ("ch02_softmax", "online_softmax", "F.softmax of the whole row",
     ("body", "online_softmax", "import torch.nn.functional as F\nreturn F.softmax(x, dim=-1).nan_to_num(0.0)"), "softmax"),
    ("ch01_naive", "naive_attention", "PyTorch's SDPA",
     ("body", "naive_attention", "import torch.nn.functional as F\nmask = causal_mask(q.shape[2], k.shape[2]) if causal else None\n"
                                 "return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, "
                                 "scale=scale).nan_to_num(0.0).to(q.dtype)"), "scaled_dot_product_attention"),
    ("ch06_backward", "naive_backward", "gradients from autograd", ("body", "naive_backward", NAIVE_BY_AUTOGRAD),
     "calls torch.autograd"),
    ("ch06_backward", "tiled_backward", "gradients from autograd", ("body", "tiled_backward", NAIVE_BY_AUTOGRAD),
     "calls torch.autograd"),
    ("ch08_module", "MultiHeadAttention.forward", "attention by hand at a guessed scale, self.attention ignored",
     ("body", "forward", MHA_BY_HAND), "self.attention"),
    # strides, float16 accumulation, masks of the whole matrix, the causal diagonal
    ("ch04_triton_primer", "softmax_kernel", "rows addressed with n_cols, not stride_row",
     ("x_ptr + row * stride_row + cols", "x_ptr + row * n_cols + cols"), "stride_row"),
    ("ch04_triton_primer", "matmul_kernel", "c's strides ignored",
     ("c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn", "c_ptr + offs_m[:, None] * N + offs_n[None, :]"),
     "c=transposed view"),
    ("ch04_triton_primer", "matmul_kernel", "a float16 accumulator",
     ("acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)", "acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=c_ptr.dtype.element_ty)"),
     "accumulate in float32"),
    ("ch03_tiling", "tiled_attention_forward", "the causal mask of the whole matrix, sliced per tile",
     ("                cols = torch.arange(j0, j0 + K_j.shape[2])\n                S_ij = S_ij.masked_fill(cols[None, :] > rows[:, None] + (Nk - Nq), float(\"-inf\"))",
      "                " + GLOBAL_MASK + "                S_ij = S_ij.masked_fill(full[i0:i0 + B_r, j0:j0 + K_j.shape[2]], float(\"-inf\"))"),
     "the size of the whole score matrix"),
    ("ch06_backward", "tiled_backward", "the causal mask of the whole matrix, sliced per tile",
     ("                rows = torch.arange(i0, i0 + Q_i.shape[2])\n                S_ij = S_ij.masked_fill(cols[None, :] > rows[:, None] + (Nk - Nq), float(\"-inf\"))",
      "                " + GLOBAL_MASK + "                S_ij = S_ij.masked_fill(full[i0:i0 + Q_i.shape[2], j0:j0 + K_j.shape[2]], float(\"-inf\"))"),
     "the size of the whole score matrix"),
    ("ch05_triton_forward", "attention_fwd_kernel", "causal top-left aligned",
     ("visible & (offs_n[None, :] <= offs_m[:, None] + Nk - Nq)", "visible & (offs_n[None, :] <= offs_m[:, None])"), "causal"),
    ("ch07_triton_backward", "dkdv_kernel", "causal top-left aligned",
     ("visible & (offs_n[:, None] <= offs_m[None, :] + Nk - Nq)", "visible & (offs_n[:, None] <= offs_m[None, :])"), "causal"),
    ("ch07_triton_backward", "dkdv_kernel", "dV_j overwritten per query block", ("dv += tl.dot(pt.to(do.dtype), do)", "dv = tl.dot(pt.to(do.dtype), do)"), None),
    ("ch08_module", "split_heads", "the features split head-minor", ("return x.view(B, N, num_heads, E // num_heads).transpose(1, 2)",
                                                                   "return x.view(B, N, E // num_heads, num_heads).permute(0, 3, 1, 2)"), None),
    ("ch08_module", "MultiHeadAttention.forward", "kv heads repeated head-major (repeat, not repeat_interleave)",
     ("split_heads(k, Hkv), split_heads(v, Hkv)", "split_heads(k, Hkv).repeat(1, H // Hkv, 1, 1), split_heads(v, Hkv).repeat(1, H // Hkv, 1, 1)"),
     "grouped"),
    # a kernel exercise whose Python computes, or returns what its kernel did not leave
    ("ch05_triton_forward", "attention_fwd_kernel", "the kernel launched, then its output overwritten in torch",
     ("    return o, lse\n", "    s = scale * q.float() @ k.float().transpose(-2, -1)\n    o.copy_(torch.softmax(s, -1) @ v.float())\n"
                           "    return o, lse\n"), "computed with torch"),
    ("ch05_triton_forward", "attention_fwd_kernel", "a copy of the kernel's output returned", ("    return o, lse\n", "    return o.clone(), lse\n"),
     "did not write"),
    ("ch05_triton_forward", "attention_fwd_kernel", "the package's kernel launched from the launcher",
     ("    attention_fwd_kernel[grid](", "    from flashcourse.kernels import forward\n    forward.attention_forward(q, k, v, causal=causal, scale=scale)\n"
                                       "    attention_fwd_kernel[grid]("), "calls flashcourse.kernels.forward"),
    ("ch05_triton_forward", "attention_fwd_kernel", "the package's attention on every call but the first",
     ("    return o, lse\n", "    global _calls\n    _calls = globals().get('_calls', 0) + 1\n    if _calls > 1:\n"
                           "        import flashcourse\n        o, lse = flashcourse.flash_attention(q, k, v, causal=causal, scale=scale, return_lse=True)\n"
                           "    return o, lse\n"), None),
]

MUTANTS += [
    # chapter 10: the window, and the key blocks it lets the kernel skip
    ("ch10_window", "window_fwd_kernel", "no block skipped", (WINDOW_LO + "\n", "        lo = 0\n"), "no row of it can see"),
    ("ch10_window", "window_fwd_kernel", "the loop ends at Nk (only the left edge skips)", (WINDOW_HI, "        hi = Nk"),
     "no row of it can see"),
    ("ch10_window", "window_fwd_kernel", "the window measured from the top-left diagonal",
     ("    offset = Nk - Nq\n", "    offset = 0\n"), None),
    ("ch10_window", "window_fwd_kernel", "the left edge off by one",
     ("offs_n[None, :] >= offs_m[:, None] + offset - WINDOW_LEFT", "offs_n[None, :] > offs_m[:, None] + offset - WINDOW_LEFT"), None),
    ("ch10_window", "window_fwd_kernel", "the edges used for the loop, not for the mask",
     ("            visible = visible & (offs_n[None, :] <= offs_m[:, None] + offset + WINDOW_RIGHT)\n",
      "            visible = visible & (offs_n[None, :] <= offs_m[:, None] + offset + WINDOW_RIGHT + BLOCK_N)\n"), None),
    ("ch10_window", "window_fwd_kernel", "K and V loaded without the given load_kv",
     ("        k, v = load_kv(K + bh * Nk * HEAD_DIM, V + bh * Nk * HEAD_DIM, start_n, offs_d, Nk, HEAD_DIM, BLOCK_N, visits)",
      "        k = load_tile(K + bh * Nk * HEAD_DIM, offs_n, offs_d, HEAD_DIM, 1, Nk, HEAD_DIM)\n"
      "        v = load_tile(V + bh * Nk * HEAD_DIM, offs_n, offs_d, HEAD_DIM, 1, Nk, HEAD_DIM)"), "load_kv"),
    # chapter 11: the ring step and the zigzag layout
    ("ch11_ring", "fold", "outputs averaged, not rescaled", ("    O_new = (alpha[..., None] * O + beta[..., None] * O_b) / total_safe[..., None]",
                                                             "    O_new = (O + O_b) / 2"), None),
    ("ch11_ring", "fold", "NaN where both states are empty", ("    m_safe = torch.where(torch.isneginf(m), 0.0, m)", "    m_safe = m"),
     "got nan"),
    ("ch11_ring", "fold", "exponentials not measured from the max", ("    m = torch.maximum(L, L_b)\n", "    m = torch.zeros_like(L)\n"),
     "L_b = L + 120"),
    ("ch11_ring", "fold", "merge_states of chapter 02", ("body", "fold", "from flashcourse.softmax import SoftmaxState, finalize, merge_states\n"
                                                      "state = lambda O, L: SoftmaxState(L.float(), torch.isfinite(L).float(), O.float())\n"
                                                      "return finalize(merge_states(state(O, L), state(O_b, L_b)))"),
     "flashcourse.softmax.merge_states"),  # (and finalize: each function the file called is named)
    ("ch11_ring", "shard_positions", "zigzag's late chunk one off", ("[rank, 2 * world_size - 1 - rank]", "[rank, 2 * world_size - 2 - rank]"),
     None),
    ("ch11_ring", "shard_positions", "no ValueError for a length that does not divide", ("    if N % chunks:\n", "    if False:\n"),
     "expected ValueError"),
]

# right in another way than solutions/: they keep every point
VARIANTS = [
    ("ch06_backward", "naive_backward", "D from P and dP (the same number before rounding)",
     ("dS = P * (dP - backward_delta(o, do)[..., None])", "dS = P * (dP - (P * dP).sum(dim=-1, keepdim=True))")),
    ("ch01_naive", "causal_mask", "torch.tril", ("body", "causal_mask", "return torch.ones(Nq, Nk, dtype=torch.bool).tril(Nk - Nq)")),
    ("ch02_softmax", "safe_softmax", "torch.where on the mask", ("body", "safe_softmax", """
m = x.amax(dim=-1, keepdim=True)
e = torch.where(torch.isneginf(x), 0.0, torch.exp(x - torch.where(torch.isneginf(m), 0.0, m)))
s = e.sum(dim=-1, keepdim=True)
return e / torch.where(s > 0, s, 1.0)""")),
]

# reads past the end of an input: they need the guard pages of a worker process
OUT_OF_BOUNDS = [
    ("ch04_triton_primer", "add_kernel", "unmasked load of x, masked store",
     ("x = tl.load(x_ptr + offs, mask=mask)", "x = tl.load(x_ptr + offs)"), "read past the end of add_kernel's x_ptr"),
    ("ch04_triton_primer", "add_kernel", "offs <= n", ("mask = offs < n\n    x = tl.load", "mask = offs <= n\n    x = tl.load"),
     "past the end of add_kernel's"),
    ("ch05_triton_forward", "attention_fwd_kernel", "unmasked K loads",
     ("k = load_tile(K + bh * Nk * HEAD_DIM, offs_n, offs_d, HEAD_DIM, 1, Nk, HEAD_DIM)", K_UNMASKED),
     "read past the end of attention_fwd_kernel's K"),
    # stores past the end, and loads past the end of tensors that the launcher allocated
    ("ch04_triton_primer", "add_kernel", "unmasked store", ("    tl.store(out_ptr + offs, x + y, mask=mask)", "    tl.store(out_ptr + offs, x + y)"),
     "wrote past the end of add_kernel's out_ptr"),
    ("ch05_triton_forward", "attention_fwd_kernel", "unmasked store of L", ("(m_i + tl.math.log2(l_safe)) * LN_2, mask=offs_m < Nq)",
                                                                            "(m_i + tl.math.log2(l_safe)) * LN_2)"),
     "wrote past the end of attention_fwd_kernel's L"),
    ("ch07_triton_backward", "dq_kernel", "unmasked load of D", ("D_i = tl.load(Delta + bh * Nq + offs_m, mask=offs_m < Nq, other=0.0)\n    dq",
                                                                 "D_i = tl.load(Delta + bh * Nq + offs_m)\n    dq"),
     "read past the end of dq_kernel's Delta"),
]


def _mutant(stem, change):
    text = solution(stem)
    return body(text, change[1], change[2]) if change[0] == "body" else edit(text, *change)


def _ids(mutants):
    return [f"{m[0][:4]}-{m[2]}" for m in mutants]


@pytest.mark.parametrize("stem, exercise, bug, change, words", MUTANTS, ids=_ids(MUTANTS))
def test_a_wrong_submission_loses_points(tmp_path, stem, exercise, bug, change, words):
    miss = first_miss(submit(tmp_path, **{stem: _mutant(stem, change)}), stem, exercise)
    assert miss is not None, f"'{bug}' kept every point of {stem}.{exercise}"
    assert miss.status == "failed", (miss.status, miss.message)
    if words:
        assert words in f"{miss.message} {miss.name} {miss.hint}", miss.message


@pytest.mark.parametrize("stem, exercise, kind, change", VARIANTS, ids=[f"{v[0][:4]}-{v[2]}" for v in VARIANTS])
def test_a_right_submission_of_another_shape_keeps_every_point(tmp_path, stem, exercise, kind, change):
    miss = first_miss(submit(tmp_path, **{stem: _mutant(stem, change)}), stem, exercise)
    assert miss is None, (miss.name, miss.message)


@pytest.mark.skipif(torch.cuda.is_available(), reason="guard pages protect CPU inputs only (the CPU interpreter)")
@pytest.mark.parametrize("stem, exercise, bug, change, words", OUT_OF_BOUNDS, ids=_ids(OUT_OF_BOUNDS))
def test_a_read_past_the_end_of_an_input_is_caught_every_time(tmp_path, stem, exercise, bug, change, words):
    miss = first_miss(submit(tmp_path, **{stem: _mutant(stem, change)}), stem, exercise, isolate=True)
    assert miss is not None and miss.status == "error" and words in miss.message, miss


@pytest.mark.gpu
def test_on_a_gpu_a_store_past_the_end_of_a_tensor_is_seen(tmp_path):
    """No guard pages on a GPU: the bytes after each tensor a kernel gets are sentinels, checked after the launch."""
    change = ("    tl.store(out_ptr + offs, x + y, mask=mask)", "    tl.store(out_ptr + offs, x + y)")
    miss = first_miss(submit(tmp_path, ch04_triton_primer=_mutant("ch04_triton_primer", change)), "ch04_triton_primer",
                      "add_kernel", isolate=True)
    assert miss is not None and "wrote past the end of add_kernel's out_ptr" in miss.message, miss
