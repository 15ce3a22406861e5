"""Issue 18's experiment script (benchmarks/perf_experiments.py) and the switches it measures: every
pinned configuration is valid and fits on chip, warp specialization changes nothing the interpreter can
see, and the whole script runs at toy sizes."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from flashcourse import INTERPRET
from flashcourse.kernels import configs
from flashcourse.kernels.configs import KernelConfig, parse_config
from flashcourse.kernels.forward import attention_forward
from helpers import make_qkv

# the benchmarks read and time the autotuner's candidates (conftest.py)
pytestmark = pytest.mark.autotune

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "perf_experiments.py"


def perf_experiments():
    """The script as the module ``perf_experiments``, loaded once: its spawned compile processes pickle
    its functions by that name."""
    if "perf_experiments" not in sys.modules:
        spec = importlib.util.spec_from_file_location("perf_experiments", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["perf_experiments"] = module
        spec.loader.exec_module(module)
    return sys.modules["perf_experiments"]


def test_parse_config_takes_warp_specialization():
    assert parse_config("128,128,8,2,tma,ws") == KernelConfig(128, 128, 8, 2, True, True)
    assert parse_config("128,64,4,2,ws") == KernelConfig(128, 64, 4, 2, False, True)
    with pytest.raises(ValueError, match="optional ',tma' and ',ws'"):
        parse_config("128,64,4,ws")


def test_every_pinned_variant_is_valid_and_fits_on_chip():
    pe = perf_experiments()
    for table in (pe.FORWARD_VARIANTS, pe.BACKWARD_VARIANTS):
        for d, variants in table.items():
            for variant in variants:
                [(kernel, text)] = variant.pins.items()
                config = parse_config(text)
                for element_size in (2,):  # fp16 and bf16
                    assert configs.fits(kernel, config, d, element_size), variant.name
                assert variant.new_to_triton == (config.warp_specialize or kernel == "dkdvdq" and config.use_tma)
                assert variant.deterministic == (kernel != "dkdvdq")


def test_descriptor_additions_of_dq_count_their_shared_memory():
    plain, staged = KernelConfig(64, 128, 8, 3, False), KernelConfig(64, 128, 8, 3, True)
    # the float32 tile dQ_i (B_r × d) waits in shared memory for the copy engine
    extra = configs.shared_bytes(staged, 128, 2, "dkdvdq") - configs.shared_bytes(plain, 128, 2, "dkdvdq")
    assert extra == 64 * 128 * 4
    assert configs.shared_bytes(staged, 128, 2, "dkdv") == configs.shared_bytes(plain, 128, 2, "dkdv")


@pytest.mark.skipif(not INTERPRET, reason="on a GPU the flag changes the compiled code (timed by the script)")
def test_warp_specialization_leaves_the_result_alone():
    q, k, v = make_qkv(B=1, H=2, Nq=45, Nk=70, d=32, dtype=torch.float16)
    plain = attention_forward(q, k, v, causal=True, scale=0.2, config=KernelConfig(32, 16, 4, 2, True))
    specialized = attention_forward(q, k, v, causal=True, scale=0.2, config=KernelConfig(32, 16, 4, 2, True, True))
    assert all(torch.equal(a, b) for a, b in zip(plain, specialized))


@pytest.mark.slow
def test_the_script_runs_every_part_at_toy_sizes(tmp_path):
    pe = perf_experiments()
    assert pe.main([str(tmp_path), "--quick", "--name", "toy"]) == 0
    data = json.loads((tmp_path / "toy.json").read_text())
    assert data["plan"] == "quick" and data["provenance"]["command"].endswith("perf_experiments.py OUT --quick")
    ours = [r for r in data["results"] if r["provider"].startswith("flashcourse")]
    # every variant of the d = 64 lists ran in its mode, the atomic ones in the long context too
    ran = {(r["provider"], r["mode"]) for r in ours if r["status"] == "ok"}
    # (on a GPU Triton 3.6 fails to compile warp specialization with 4 warps: skipped, with the reason)
    ran |= {(r["provider"], r["mode"]) for r in ours if r["status"] == "skipped" and r["provider"].endswith(",ws")
            and "precompiling it failed" in (r["note"] or "")}
    forward, backward = pe.variants_for(64, quick=True)
    assert {(v.name, "fwd") for v in forward} <= ran
    assert {(v.name, "bwd") for v in backward if not v.needs_gpu} <= ran
    assert {("flashcourse", "fwd+bwd"), ("flashcourse-atomic", "fwd+bwd")} <= ran
    # what cannot run here says why; nothing failed its check
    assert all(r["status"] in ("ok", "skipped") for r in data["results"])
    assert [r["provider"] for r in data["long_context"]] == ["flashcourse", "flashcourse-atomic",
                                                             "flashcourse-atomic@32,128,4,4,tma", "sdpa-cudnn"]
    tables = (tmp_path / "toy.md").read_text()
    for heading in ("## A. forward", "## B. backward", "## C. long context", "## D. bwd", "## Decisions"):
        assert heading in tables
    assert "- bwd atomic ÷ default: ×" in tables and data["tables"] == tables
