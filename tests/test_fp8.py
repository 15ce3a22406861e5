"""FP8 attention's host side on the CPU: quantization and its scales, the Hadamard rotation, V's layout,
the accuracy reference, and the refusal where there are no FP8 tensor cores (issue 19)."""

import json
import math

import pytest

import flashcourse
import torch

from flashcourse import fp8, naive_attention  # first: on a CPU it switches Triton's interpreter on
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from flashcourse.kernels.common import to_dtype  # noqa: E402
from tests.helpers import make_qkv, rel_err

E4M3_GRID = torch.arange(256, dtype=torch.uint8).view(fp8.E4M3).float()
E4M3_VALUES = E4M3_GRID[torch.isfinite(E4M3_GRID)]  # every finite e4m3 number (the two NaNs left out)


def blocky(B=2, H=3, N=300, d=16, seed=0):
    """Random rows whose magnitude changes by block of 128 rows and by head (1e-3 ... 1e3)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, H, N, d, generator=g)
    magnitude = 10.0 ** torch.randint(-3, 4, (B, H, fp8._blocks(N)), generator=g).float()
    return x * fp8.per_row(magnitude, N)


@pytest.mark.parametrize("scaling", fp8.SCALINGS)
def test_quantize_round_trip_within_half_a_step(scaling):
    x = blocky()
    x8, descale = fp8.quantize(x, scaling)
    assert x8.dtype == torch.float8_e4m3fn and descale.dtype == torch.float32
    assert descale.shape == (2, 3, 3)  # ⌈300 / 128⌉ blocks of rows
    back = fp8.dequantize(x8, descale)
    step = fp8.per_row(descale, x.shape[2])
    # every element: a normal number within half a step of its 3 mantissa bits (2⁻⁴ relative), a
    # subnormal within half of the subnormal step 2⁻⁹ (in units of the descale factor)
    bound = torch.maximum(x.abs() * 2.0**-4, step * 2.0**-10) * (1 + 1e-6)
    assert ((back - x).abs() <= bound).all()
    # values already on the grid come back exactly
    assert torch.equal(fp8.dequantize(*fp8.quantize(back, scaling)), back)


def test_scales_put_each_blocks_largest_value_on_448():
    x = blocky()
    x[0, 1, 128:256] = 0.0  # a block of zeros: descale 1, not 0 (no division by zero)
    x8, descale = fp8.quantize(x, "block")
    amax = fp8.quantize(x.abs(), "block")[0].float()
    for b, h, j in torch.cartesian_prod(*(torch.arange(n) for n in descale.shape)).tolist():
        rows = slice(j * 128, (j + 1) * 128)
        if (b, h, j) == (0, 1, 1):
            assert descale[b, h, j] == 1.0 and (x8[b, h, rows].float() == 0).all()
        else:
            assert amax[b, h, rows].max() == 448.0
            assert descale[b, h, j] == pytest.approx(x[b, h, rows].abs().max().item() / 448.0, rel=1e-6)
    x8, descale = fp8.quantize(x, "tensor")
    assert (descale == x.abs().max() / 448.0).all() and x8.float().abs().max() == 448.0


def test_block_scales_keep_small_blocks_that_a_tensor_scale_flushes_to_zero():
    x = torch.randn(1, 1, 256, 8)
    x[..., :128, :] *= 1e6  # one block a million times larger than the other
    small = slice(128, 256)
    for scaling, most in (("tensor", 0.5), ("block", 0.07)):
        back = fp8.dequantize(*fp8.quantize(x, scaling))
        err = rel_err(back[..., small, :], x[..., small, :])
        assert (err > most) if scaling == "tensor" else (err < most), (scaling, err)


@pytest.mark.parametrize("d", [1, 2, 16, 64, 128, 256])
def test_hadamard_rotation_is_orthogonal_with_entries_of_one_size(d):
    R = fp8.hadamard_rotation(d, seed=3).double()
    assert R.shape == (d, d) and R.dtype == torch.float64
    torch.testing.assert_close(R @ R.T, torch.eye(d, dtype=torch.float64), atol=1e-6, rtol=0)
    assert torch.allclose(R.abs(), torch.full_like(R, 1 / math.sqrt(d)))
    assert torch.equal(fp8.hadamard_rotation(d, seed=3), fp8.hadamard_rotation(d, seed=3))
    if d >= 16:
        assert not torch.equal(fp8.hadamard_rotation(d, seed=3), fp8.hadamard_rotation(d, seed=4))


@pytest.mark.parametrize("d", [0, 3, 80, 96])
def test_hadamard_rotation_refuses_head_dims_that_are_not_powers_of_two(d):
    with pytest.raises(ValueError, match=r"power of two.*rotate=False"):
        fp8.hadamard_rotation(d)


def test_rotation_keeps_scores_and_spreads_outlier_channels():
    q, k, _ = fp8.outlier_inputs(N=64, d=64, channels=2, factor=20.0)
    R = fp8.hadamard_rotation(64)
    qr, kr = fp8.rotate(q, R), fp8.rotate(k, R)
    torch.testing.assert_close(qr @ kr.mT, q @ k.mT, rtol=1e-5, atol=1e-3)
    # the outliers' energy is spread over all 64 channels: the largest |value| falls several-fold
    assert q.abs().amax() > 3 * qr.abs().amax()
    # ... and so does the size of q ∘ k that a dot product's rounding error scales with
    assert (q[..., :1, :] * k).norm() > 3 * (qr[..., :1, :] * kr).norm()


@pytest.mark.parametrize("N", [1, 17, 130])
def test_keys_contiguous_stores_v_transposed_with_aligned_rows(N):
    v8 = fp8.quantize(torch.randn(2, 3, N, 40), "block")[0]
    vt = fp8.keys_contiguous(v8)
    assert vt.shape == v8.shape and vt.stride(-2) == 1 and vt.stride(-1) % 16 == 0
    assert torch.equal(vt.float(), v8.float())
    assert fp8.keys_contiguous(vt) is vt


@pytest.mark.parametrize("scaling", fp8.SCALINGS)
def test_reference_is_exact_attention_for_inputs_on_the_e4m3_grid(scaling):
    """Inputs that e4m3 holds exactly (grid values, each block's largest at 448 · δ) lose nothing to
    quantization: the reference is then float64 attention up to float32 rounding."""
    g = torch.Generator().manual_seed(1)
    B, H, Hkv, Nq, Nk, d = 1, 4, 2, 17, 150, 16

    def on_grid(h, n, descale):
        x = E4M3_VALUES[torch.randint(len(E4M3_VALUES), (B, h, n, d), generator=g)] / 64
        x[..., ::128, 0] = 448.0 / 64  # the largest of every block, so that its descale is 1/64
        return x * descale

    q, k, v = on_grid(H, Nq, 0.25), on_grid(Hkv, Nk, 0.5), on_grid(Hkv, Nk, 2.0)
    inputs = fp8.quantize_attention_inputs(q, k, v, scaling=scaling)
    assert all(torch.equal(back, x) for back, x in zip(fp8.dequantized(inputs), (q, k, v)))
    for causal in (False, True):
        ref = fp8.reference_attention(inputs, causal=causal, scale=0.05)
        exact = naive_attention(q.double(), k.double(), v.double(), causal=causal, scale=0.05)
        assert ref.dtype == torch.float32
        assert rel_err(ref, exact) < 1e-6


def test_quantized_inputs_have_the_kernels_layout():
    q, k, v = make_qkv(B=2, H=4, Hkv=2, Nq=17, Nk=200, d=32, dtype=torch.bfloat16)
    inputs = fp8.quantize_attention_inputs(q, k, v)
    assert all(t.dtype == fp8.E4M3 for t in inputs[:3])
    assert inputs.q.shape == q.shape and inputs.k.shape == k.shape and inputs.v.shape == v.shape
    assert inputs.v.stride(-2) == 1
    assert inputs.q_descale.shape == (2, 4, 1) and inputs.k_descale.shape == inputs.v_descale.shape == (2, 2, 2)


def test_reference_error_on_random_inputs_and_what_the_rotation_buys_on_outliers():
    """Plain random inputs: e4m3 costs a few percent (bfloat16 a few tenths of one). With outlier
    channels in q and k the error grows several-fold, and the rotation wins most of it back."""
    plain = {(r["scaling"], r["rotate"]): r["error"]
             for r in fp8.reference_errors(*fp8.outlier_inputs(N=128, channels=0), causal=True)}
    assert plain[None, False] < 0.01 and all(0.01 < e < 0.08 for key, e in plain.items() if key[0])
    outliers = {(r["scaling"], r["rotate"]): r["error"]
                for r in fp8.reference_errors(*fp8.outlier_inputs(N=128, channels=4, factor=20.0))}
    for scaling in fp8.SCALINGS:
        assert outliers[scaling, False] > 2 * outliers[scaling, True], outliers


def test_rotated_reference_matches_the_unrotated_attention():
    q, k, v = make_qkv(B=1, H=2, Nq=70, d=32, dtype=torch.float32)
    exact = naive_attention(q.double(), k.double(), v.double(), causal=True)
    for rotate_qk in (False, True):
        ref = fp8.reference_attention(fp8.quantize_attention_inputs(q, k, v, rotate_qk=rotate_qk), causal=True)
        assert rel_err(ref, exact) < 0.08


def test_fp8_is_refused_on_the_cpu_with_what_to_do():
    with pytest.raises(RuntimeError, match=r"FP8 tensor cores.*fp8=False.*bfloat16.*H100"):
        fp8.check_fp8_device("cpu")


def test_fp8_is_refused_on_a_gpu_without_fp8_tensor_cores(monkeypatch):
    monkeypatch.setattr(fp8, "INTERPRET", False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(RuntimeError, match=r"compute capability 8\.9.*A100-SXM4-80GB, is 8\.0.*fp8=False"):
        fp8.check_fp8_device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    fp8.check_fp8_device("cuda")  # Hopper passes


@triton.jit
def _to_e4m3(X, Y, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(Y + offs, to_dtype(tl.load(X + offs), tl.float8e4nv))


def test_kernels_round_to_e4m3_as_torch_does(device):
    """``to_dtype`` to e4m3 on every number around e4m3's grid: its values, the midpoints between
    neighbours (ties go to even), just above and below them, past ±448 (saturated) and in the subnormals."""
    grid = E4M3_VALUES.sort().values
    mids = (grid[1:] + grid[:-1]) / 2
    x = torch.cat([grid, mids, mids.nextafter(grid[1:]), mids.nextafter(grid[:-1]), torch.tensor([460.0, -1e4, 1e-9])])
    x = torch.nn.functional.pad(x, (0, triton.next_power_of_2(len(x)) - len(x))).to(device)
    y = torch.empty(len(x), dtype=fp8.E4M3, device=device)
    _to_e4m3[(1,)](x, y, len(x))
    assert torch.equal(y.float(), x.clamp(-448, 448).to(fp8.E4M3).float())


# ------------------------------------------------------------------------------------------------
# The FP8 kernel. flash_attention refuses FP8 without FP8 tensor cores, but Triton's interpreter runs
# the same kernel (its e4m3 products are exact, and e4m3 rounding is done by hand there, as on a GPU):
# these tests lift the refusal on the CPU to check the kernel's logic in CI. On a GPU they run there.


@pytest.fixture
def fp8_device(device, monkeypatch):
    if device == "cpu":
        monkeypatch.setattr(fp8, "check_fp8_device", lambda device: None)
    elif torch.cuda.get_device_capability() < fp8.FP8_CAPABILITY:
        pytest.skip("this GPU has no FP8 tensor cores (compute capability < 8.9)")
    return device


KERNEL_CASES = [
    # B, H, Hkv, Nq, Nk, d, causal, scaling, rotate
    (1, 2, 1, 70, 70, 32, False, "block", False),  # grouped heads
    (1, 2, 2, 40, 150, 32, True, "block", True),  # Nq < Nk, 2 blocks of descale factors, the rotation
    (2, 2, 1, 150, 133, 16, True, "tensor", False),  # Nq > Nk: 17 rows see no key; d padded to 32
]


@pytest.mark.parametrize("B, H, Hkv, Nq, Nk, d, causal, scaling, rotate", KERNEL_CASES)
def test_fp8_forward_error_within_twice_the_references(fp8_device, B, H, Hkv, Nq, Nk, d, causal, scaling, rotate):
    """Issue 19's rule: the error against float64 is at most twice that of attention in float32 on the
    same e4m3 inputs. v's blocks differ 100-fold in size (the descale factor of V_j changes in the loop)."""
    q, k, v = make_qkv(B=B, H=H, Hkv=Hkv, Nq=Nq, Nk=Nk, d=d, dtype=torch.float32, seed=Nq + Nk, device=fp8_device)
    v = v * fp8.per_row(torch.tensor([1.0, 100.0], device=fp8_device)[: fp8._blocks(Nk)].expand(B, Hkv, -1), Nk)
    o, lse = fc_flash_attention(q, k, v, causal=causal, fp8=True, fp8_scaling=scaling, rotate=rotate, return_lse=True)
    assert o.dtype == q.dtype and lse.dtype == torch.float32
    exact = naive_attention(q.double(), k.double(), v.double(), causal=causal)
    ref, ref_lse = fp8.reference_attention(fp8.quantize_attention_inputs(q, k, v, scaling=scaling, rotate_qk=rotate),
                                           causal=causal, dtype=torch.float64, return_lse=True)
    assert rel_err(o, exact) <= 2 * rel_err(ref, exact)
    # L is not touched by P's rounding: the reference's, up to the rounding of S (−inf for rows with no key).
    # Hopper's FP8 matrix units add their products with about 14 bits of mantissa, not float32's 24
    # (DeepSeek-V3 report, section 3.3.2): S and so L are good to about 2^-13 relative there.
    rtol = 2**-12 if o.is_cuda else 0
    torch.testing.assert_close(lse.double(), ref_lse, rtol=rtol, atol=1e-4)
    if causal and Nq > Nk:
        assert (o[:, :, : Nq - Nk] == 0).all()


def test_fp8_kernel_writes_every_element(fp8_device):
    from flashcourse.kernels.forward import attention_forward

    q, k, v = make_qkv(B=1, H=2, Nq=33, Nk=47, d=24, dtype=torch.float32, device=fp8_device)
    inputs = fp8.quantize_attention_inputs(q, k, v)
    out = torch.full(q.shape, float("nan"), dtype=torch.float16, device=fp8_device)
    o, lse = attention_forward(inputs.q, inputs.k, inputs.v, causal=True, scale=0.2, descale=inputs[3:], out=out)
    ref = fp8.reference_attention(inputs, causal=True, scale=0.2)
    assert o is out and torch.isfinite(o).all() and torch.isfinite(lse).all()
    assert rel_err(o, ref) < 0.05


def test_fp8_inputs_already_quantized_give_the_same_output(fp8_device):
    """Inputs in e4m3 with their descale factors (per block, or one number per tensor) run the same
    kernel on the same numbers as fp8=True; v in its ordinary layout is stored key-major for it."""
    q, k, v = make_qkv(B=1, H=2, Nq=20, Nk=140, d=32, dtype=torch.bfloat16, device=fp8_device)
    for scaling in fp8.SCALINGS:
        (q8, qd), (k8, kd), (v8, vd) = (fp8.quantize(t, scaling) for t in (q, k, v))
        if scaling == "tensor":
            qd, kd, vd = qd[0, 0, 0], kd.flatten()[:1], vd[:1, :1, 0]  # one number each, in three shapes
        o8 = fc_flash_attention(q8, k8, v8, descale=(qd, kd, vd), causal=True)
        o = fc_flash_attention(q, k, v, fp8=True, fp8_scaling=scaling, causal=True)
        assert o8.dtype == torch.bfloat16 and torch.equal(o8, o)


def test_fp8_forward_refuses_a_gradient(fp8_device):
    q, k, v = make_qkv(Nq=8, d=16, dtype=torch.float32, device=fp8_device)
    with pytest.raises(RuntimeError, match=r"no backward.*torch.no_grad\(\)"):
        fc_flash_attention(q.requires_grad_(), k, v, fp8=True)
    with torch.no_grad():
        fc_flash_attention(q, k, v, fp8=True)


def fc_flash_attention(*args, **kwargs):
    from flashcourse import flash_attention

    return flash_attention(*args, **kwargs)


# ------------------------------------------------------------------------------------------------
# What flash_attention says on a machine without FP8, and about arguments FP8 does not take


@pytest.mark.skipif(not flashcourse.INTERPRET, reason="the refusal of Triton's CPU interpreter; a GPU runs test_gpu_fp8.py")
def test_flash_attention_refuses_fp8_on_the_cpu():
    q, k, v = make_qkv(Nq=8, d=16, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"FP8 tensor cores.*interpreter.*fp8=False"):
        fc_flash_attention(q, k, v, fp8=True)
    inputs = fp8.quantize_attention_inputs(q, k, v)
    with pytest.raises(RuntimeError, match=r"FP8 tensor cores"):
        fc_flash_attention(*inputs[:3], descale=inputs[3:])


@pytest.mark.parametrize("kwargs, message", [
    (dict(fp8=True, softcap=5.0), r"causal, scale and return_lse only, not softcap"),
    (dict(fp8=True, window_size=(4, 0), dropout_p=0.1), r"not window_size, dropout_p"),
    (dict(rotate=True), r"pass fp8=True with them"),
    (dict(fp8=True, fp8_scaling="row"), r"'tensor'.*'block'"),
    (dict(fp8=True, rotate=True, d=24), r"power of two.*rotate=False"),
    (dict(fp8=True, descale=(1.0, 1.0, 1.0)), r"descale is for inputs already in torch.float8_e4m3fn"),
    (dict(quantized=True), r"need descale = \(q_descale, k_descale, v_descale\)"),
    (dict(quantized=True, descale=(torch.ones(3), torch.ones(1), torch.ones(1))),
     r"q_descale must be .*got shape \(3,\)"),
    (dict(quantized=True, descale=(torch.ones(1), 1.0, torch.ones(1))), r"k_descale must be a float tensor"),
    (dict(quantized=True, rotate=True), r"quantized already"),
])
def test_fp8_arguments_are_checked_with_what_to_do(kwargs, message):
    kwargs = dict(kwargs)
    q, k, v = make_qkv(Nq=8, d=kwargs.pop("d", 16), dtype=torch.float32)
    if kwargs.pop("quantized", False):
        q, k, v = (fp8.quantize(t)[0] for t in (q, k, v))
    with pytest.raises((TypeError, ValueError), match=message):
        fc_flash_attention(q, k, v, **kwargs)


@pytest.mark.slow
def test_fp8_benchmark_runs_every_part_at_toy_sizes(tmp_path, fp8_device):
    """benchmarks/fp8.py --tiny: speed rows for each FP8 configuration, the error table, JSON and Markdown."""
    from tests.test_bench import script

    assert script("fp8").main([str(tmp_path), "--tiny", "--name", "toy"]) == 0
    data = json.loads((tmp_path / "toy.json").read_text())
    assert data["plan"] == "tiny" and data["provenance"]["command"] == "python3 benchmarks/fp8.py OUT --tiny"
    assert [r["status"] for r in data["speed"]] == ["ok", "ok"]
    assert all(c["status"] == "ok" for r in data["speed"] for c in r["fp8"])
    assert len(data["errors"]) == 8 and all(r["fp8_kernel"] <= 2 * r["reference"] for r in data["errors"])
    assert "| outlier channels | 64 | block | yes |" in (tmp_path / "toy.md").read_text()
