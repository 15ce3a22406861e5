"""The launch configurations of the kernels (flashcourse/kernels/configs.py): one table, one
resource model, pinned configurations that are used exactly."""

import pytest
import torch

from flashcourse import INTERPRET
from flashcourse.kernels import configs
from flashcourse.kernels.configs import CANDIDATES, KERNELS, KernelConfig, fits, parse_config, pinned
from flashcourse.kernels.forward import attention_forward
from helpers import make_qkv


def test_every_candidate_fits_on_chip():
    for kernel in KERNELS:
        for (block_d, element_size), shapes in CANDIDATES[kernel].items():
            for shape in shapes:
                assert fits(kernel, KernelConfig(*shape), block_d, element_size), (kernel, block_d, shape)


def test_resource_model_refuses_what_does_not_fit():
    # dK/dV with B_c = 128 at d = 128 on 4 warps: 2 · 128 · 128 / 128 = 256 accumulator registers a thread
    assert not fits("dkdv", KernelConfig(128, 128, 4, 4), 128, 2)
    # forward float32 d = 128 with 128 × 64 tiles and 3 stages: 4 · 128 · (128 + 3 · 128) bytes > 227 KB
    assert not fits("forward", KernelConfig(128, 64, 8, 3), 128, 4)
    assert fits("forward", KernelConfig(128, 64, 8, 3), 128, 2)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("block_d, element_size", [(16, 2), (64, 2), (128, 2), (256, 2), (32, 4), (128, 4), (256, 4)])
def test_pruner_keeps_the_listed_shapes(kernel, block_d, element_size):
    """The autotuner tries exactly the table's shapes for the padded head dim and element size."""
    prune = configs._pruner(kernel)
    all_configs = [configs._triton_config(kernel, c) for c in configs._candidates(kernel)]
    q = torch.empty(1, dtype={2: torch.float16, 4: torch.float32}[element_size])
    listed = CANDIDATES[kernel][(max(64, block_d), element_size)]
    for tma_mode in (0, 1, 2) if kernel in ("forward", "decode") else (0,):
        kept = prune(all_configs, {"Q": q}, BLOCK_D=block_d, TMA_MODE=tma_mode)
        shapes = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept}
        assert shapes == set(listed)
        assert {c.kwargs.get("USE_TMA", False) for c in kept} == {0: {False}, 1: {False, True}, 2: {True}}[tma_mode]


def test_parse_config():
    assert parse_config("128,64,4,2,tma") == KernelConfig(128, 64, 4, 2, True)
    assert parse_config(" 32, 16, 4, 1 ") == KernelConfig(32, 16, 4, 1, False)
    for bad in ("128,64", "a,b,c,d", "128,64,0,2"):
        with pytest.raises(ValueError, match="B_r,B_c,warps,stages"):
            parse_config(bad)


def test_pinned_configuration_comes_from_the_argument_then_the_environment(monkeypatch):
    monkeypatch.setenv("FLASHCOURSE_CONFIG_DQ", "64,32,4,2")
    assert pinned("dq") == KernelConfig(64, 32, 4, 2, False)
    assert pinned("dq", KernelConfig(16, 16)) == KernelConfig(16, 16)
    monkeypatch.delenv("FLASHCOURSE_CONFIG_DQ")
    assert pinned("dq") == (configs.INTERPRET_CONFIGS["dq"] if INTERPRET else None)


@pytest.mark.skipif(not INTERPRET, reason="the interpreter runs whatever it is given; a GPU compiles it")
def test_a_pinned_configuration_is_used_exactly(monkeypatch):
    """FLASHCOURSE_CONFIG_FORWARD reaches the launch: the kernel runs with those blocks, nothing else."""
    seen = []
    launch = configs.launch
    monkeypatch.setattr("flashcourse.kernels.forward.launch",
                        lambda *a, **kw: seen.append(launch(*a, **kw)) or seen[-1])
    q, k, v = make_qkv(B=1, H=1, Nq=20, Nk=20, d=16, dtype=torch.float32)
    monkeypatch.setenv("FLASHCOURSE_CONFIG_FORWARD", "16,64,2,1")
    attention_forward(q, k, v, causal=True, scale=0.25)
    monkeypatch.setenv("FLASHCOURSE_CONFIG_FORWARD", "16,64,2,1,tma")
    attention_forward(q, k, v, causal=True, scale=0.25)
    assert seen == [KernelConfig(16, 64, 2, 1, False), KernelConfig(16, 64, 2, 1, True)]
    with pytest.raises(ValueError, match="loads through descriptors"):
        attention_forward(q, k, v, causal=True, scale=0.25, use_tma=False)
    # the interpreter's own configuration loads through descriptors where the layout allows it
    monkeypatch.delenv("FLASHCOURSE_CONFIG_FORWARD")
    attention_forward(q, k, v, causal=True, scale=0.25)
    assert seen[-1] == configs.INTERPRET_CONFIGS["forward"]._replace(use_tma=True)
