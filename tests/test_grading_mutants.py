"""Deliberately wrong implementations lose points: each mutant is a solution with one classic bug."""

import pytest

from flashcourse.grading import grade
from flashcourse.grading.report import total
from flashcourse.grading.runner import REPO_ROOT

# (file, exercise, the bug, solution text, replacement)
MUTANTS = [
    ("ch01_naive", "causal_mask", "causal mask off by one", "return j <= i + (Nk - Nq)", "return j < i + (Nk - Nq)"),
    ("ch01_naive", "causal_mask", "causal mask top-left aligned", "return j <= i + (Nk - Nq)", "return j <= i"),
    ("ch01_naive", "naive_attention", "scale applied twice", "S = scale * (Q @ K", "S = scale * scale * (Q @ K"),
    ("ch01_naive", "naive_attention", "softmax over the wrong dim", "torch.softmax(S, dim=-1).nan", "torch.softmax(S, dim=-2).nan"),
    ("ch02_softmax", "safe_softmax", "missing max subtraction", "e = torch.exp(x - m)", "e = torch.exp(x)"),
    ("ch02_softmax", "online_softmax", "running sum not rescaled",
     "l = l * torch.exp(m - m_safe) + ", "l = l + "),
    ("ch02_softmax", "merge_states", "o not rescaled", "alpha[..., None] * a.o + beta[..., None] * b.o", "a.o + b.o"),
    ("ch02_softmax", "merge_states", "NaN for empty states", "m_safe = torch.where(torch.isneginf(m), 0.0, m)\n    # α",
     "m_safe = m\n    # α"),
    ("ch03_tiling", "tiled_attention_forward", "accumulator not rescaled",
     "O_i = alpha[..., None] * O_i + P_ij @ V_j", "O_i = O_i + P_ij @ V_j"),
    ("ch03_tiling", "tiled_attention_forward", "logsumexp without the max", "m_i + torch.log(l_i)", "torch.log(l_i)"),
    ("ch03_tiling", "tiled_attention_forward", "causal mask off by one", "cols[None, :] > rows[:, None]",
     "cols[None, :] >= rows[:, None]"),
    ("ch03_tiling", "tiled_attention_forward", "no final division by l", "O_i / l_i[..., None], 0.0", "O_i, 0.0"),
    ("ch04_triton_primer", "softmax_kernel", "padding loaded as 0, not −inf",
     'mask=mask, other=float("-inf")).to(tl.float32)', "mask=mask, other=0.0).to(tl.float32)"),
    ("ch04_triton_primer", "matmul_kernel", "b's column stride ignored", "offs_n[None, :] * stride_bn,", "offs_n[None, :],"),
    ("ch06_backward", "naive_backward", "dS without D", "dS = P * (dP - backward_delta(o, do)[..., None])", "dS = P * dP"),
    ("ch06_backward", "naive_backward", "scale applied to dV too", "dV = P.transpose(-2, -1) @ dO",
     "dV = scale * P.transpose(-2, -1) @ dO"),
    ("ch06_backward", "tiled_backward", "L = −inf rows not guarded", "L = torch.where(torch.isneginf(lse), 0.0, lse.float())",
     "L = lse.float()"),
    ("ch06_backward", "tiled_backward", "dK_j overwritten, not accumulated", "dK[:, :, j0 : j0 + block_n] += ",
     "dK[:, :, j0 : j0 + block_n] = "),
    ("ch05_triton_forward", "attention_fwd_kernel", "accumulator not rescaled",
     "acc = alpha[:, None] * acc + tl.dot", "acc = acc + tl.dot"),
    ("ch05_triton_forward", "attention_fwd_kernel", "logsumexp left in base 2",
     "(m_i + tl.math.log2(l_safe)) * LN_2", "(m_i + tl.math.log2(l_safe))"),
    ("ch05_triton_forward", "attention_fwd_kernel", "causal mask off by one",
     "visible & (offs_n[None, :] <= offs_m[:, None] + Nk - Nq)", "visible & (offs_n[None, :] < offs_m[:, None] + Nk - Nq)"),
    ("ch07_triton_backward", "dkdv_kernel", "dK not scaled", "dk = dk * scale", "dk = dk"),
    ("ch07_triton_backward", "dq_kernel", "dS without D", "ds = p * (tl.dot(do, tl.trans(v)) - D_i[:, None])",
     "ds = p * tl.dot(do, tl.trans(v))"),
    ("ch08_module", "MultiHeadAttention.forward", "causal flag dropped", ", causal=self.causal)", ")"),
    ("ch08_module", "split_heads", "heads split without the transpose", ".transpose(1, 2)\n", ".reshape(B, num_heads, N, -1)\n"),
    ("ch03_tiling", "tiled_attention_forward", "not tiled: the whole score matrix at once",
     "for i0 in range(0, Nq, block_m):", "block_m, block_n = Nq, Nk\n    for i0 in range(0, Nq, block_m):"),
    ("ch06_backward", "tiled_backward", "not tiled: the whole score matrix at once",
     "for j0 in range(0, Nk, block_n):", "block_m, block_n = Nq, Nk\n    for j0 in range(0, Nk, block_n):"),
    ("ch02_softmax", "online_softmax", "not online: the row max first",
     "    for start in range(0, x.shape[-1], block):\n", "    m = x.amax(dim=-1)\n    for start in range(0, x.shape[-1], block):\n"),
]


@pytest.mark.parametrize("stem, exercise, bug, old, new", MUTANTS, ids=[f"{m[0][:4]}-{m[2]}" for m in MUTANTS])
def test_a_classic_bug_loses_points(tmp_path, stem, exercise, bug, old, new):
    text = (REPO_ROOT / "solutions" / f"{stem}.py").read_text()
    assert text.count(old) == 1, f"the mutant '{bug}' no longer matches solutions/{stem}.py"
    (tmp_path / f"{stem}.py").write_text(text.replace(old, new))
    results = grade([stem], tmp_path, isolate=False, exercises=[exercise])
    earned, possible = total(results)
    assert earned < possible, f"'{bug}' kept all {possible} points of {stem}.{exercise}"
    assert all(r.status in ("passed", "failed") for r in results)
