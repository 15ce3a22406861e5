"""``flashcourse bench`` on the CPU: FLOP counts, checks before timing, statuses, files, ratio table, CLI."""

import csv
import importlib.util
import json
import warnings
from pathlib import Path

import pytest
import torch

from flashcourse import bench, naive_attention
from flashcourse.cli import main as cli_main

TINY = dict(seqlens=[32], head_dims=[16], batch=1, heads=2, dtypes=["float32"], warmup_ms=0, rep_ms=1, progress=False)


def by_name(results, provider, mode="fwd"):
    [m] = [m for m in results if m.provider == provider and m.mode == mode]
    return m


def test_flops_and_default_sizes():
    B, H, N, d = 2, 3, 1024, 64
    fwd = 4 * B * H * N * N * d
    assert bench.attention_flops(B, H, N, d, causal=False) == fwd
    assert bench.attention_flops(B, H, N, d, causal=True) == fwd / 2
    assert bench.attention_flops(B, H, N, d, causal=False, mode="bwd") == 2.5 * fwd
    assert bench.attention_flops(B, H, N, d, causal=True, mode="fwd+bwd") == 3.5 * fwd / 2
    with pytest.raises(ValueError, match="mode"):
        bench.attention_flops(B, H, N, d, causal=False, mode="backward")
    # B·N = 16k tokens, H·d = 2048, as in the FlashAttention papers
    assert bench.default_batch_heads(1024, 64) == (16, 32)
    assert bench.default_batch_heads(16384, 128) == (1, 16)
    assert bench.default_batch_heads(131072, 128) == (1, 16)
    assert bench.io_bytes(1, 16, 131072, 128, torch.float16, "fwd+bwd") == 8 * 16 * 131072 * 128 * 2


def test_wrong_providers_are_flagged_and_the_run_goes_on():
    def wrong_output(q, k, v, causal):
        return v  # the right shape, the wrong function

    def wrong_grads(q, k, v, causal):
        # the right output with no gradient flowing to q, k, v
        return naive_attention(q.detach(), k.detach(), v.detach(), causal=causal) + 0 * (q + k + v)

    def nan_output(q, k, v, causal):
        return torch.full_like(q, float("nan"))

    def out_of_memory(q, k, v, causal):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")

    def broken(q, k, v, causal):
        raise NotImplementedError("stub")

    extra = dict(wrong_output=wrong_output, wrong_grads=wrong_grads, nan_output=nan_output, oom=out_of_memory, broken=broken)
    results = bench.benchmark(providers=["naive", *extra, "sdpa-cudnn", "sdpa-math"], modes=["fwd", "bwd"],
                              causal=[True], extra_providers=extra, **TINY)
    assert len(results) == 2 * (len(extra) + 3)
    for mode in ("fwd", "bwd"):
        for name in ("naive", "sdpa-math"):
            m = by_name(results, name, mode)
            assert m.status == "ok", m.note
            assert m.ms > 0 and m.tflops > 0 and m.max_rel_err < 1e-5
            assert m.peak_mib is None  # CPU: n/a
        assert by_name(results, "wrong_output", mode).status == "failed"
        assert by_name(results, "nan_output", mode).status == "failed"
        assert by_name(results, "oom", mode).status == "oom"
        assert by_name(results, "broken", mode).status == "error"
        assert "NotImplementedError" in by_name(results, "broken", mode).note
        cudnn = by_name(results, "sdpa-cudnn", mode)
        assert cudnn.status == "skipped" and "unavailable" in cudnn.note
    # a forward that is right and a backward that is wrong: timed forward, failed backward
    assert by_name(results, "wrong_grads", "fwd").status == "ok"
    bad = by_name(results, "wrong_grads", "bwd")
    assert bad.status == "failed" and bad.ms is None and "gradients" in bad.note
    failed = by_name(results, "wrong_output")
    assert failed.ms is None and failed.tflops is None and failed.max_rel_err > 0.1


def test_exceptions_become_statuses_with_reasons():
    class Caught:  # what warnings.catch_warnings(record=True) collects
        def __init__(self, message):
            self.message = message

    # PyTorch on a GPU: the RuntimeError is generic, the warnings say why each backend declined
    caught = [Caught("Flash attention kernel not used because:"), Caught("Flash attention requires q,k,v to have head dim <= 256")]
    status, note = bench._classify(RuntimeError("No available kernel. Aborting execution."), caught)
    assert status == "skipped" and "head dim <= 256" in note and "not used because" not in note
    cpu_oom = RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory: you tried 64 GB")
    assert bench._classify(cpu_oom)[0] == "oom"
    assert bench._classify(torch.cuda.OutOfMemoryError("CUDA out of memory.\nTried to allocate"))[1] == \
        "OutOfMemoryError: CUDA out of memory."
    assert bench._classify(bench.Unavailable("not built yet")) == ("skipped", "not built yet")
    assert bench._classify(ValueError("q must have 4 dimensions")) == ("error", "ValueError: q must have 4 dimensions")


def test_flashcourse_triton_kernels_checked_and_timed():
    results = bench.benchmark(providers=["flashcourse", "tiled"], modes=["fwd+bwd"], causal=[True], **TINY)
    for m in results:
        assert m.status == "ok", (m.provider, m.note)
        assert m.max_rel_err < 1e-3 and m.tflops > 0


def test_time_budget_and_slow_providers_are_skipped():
    results = bench.benchmark(providers=["naive"], modes=["fwd"], time_budget_s=0, **TINY)
    assert [m.status for m in results] == ["skipped", "skipped"] and "budget" in results[0].note
    [m] = bench.benchmark(providers=["tiled"], modes=["fwd"], slow_max_n=16, causal=[False], **TINY)
    assert m.status == "skipped" and "slow" in m.note


def test_inputs_that_do_not_fit_mark_the_shape_oom(monkeypatch):
    def randn(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 512.00 GiB")

    monkeypatch.setattr(torch, "randn", randn)
    results = bench.benchmark(providers=["naive", "sdpa-math"], modes=["fwd", "bwd"], **TINY)
    assert len(results) == 8 and {m.status for m in results} == {"oom"}
    assert results[0].note.startswith("allocating the inputs: OutOfMemoryError")


def test_unknown_provider_or_mode_says_what_exists():
    with pytest.raises(ValueError, match="sdpa-flash"):
        bench.benchmark(providers=["flash"], **TINY)
    with pytest.raises(ValueError, match="fwd"):
        bench.benchmark(providers=["naive"], modes=["forward"], **TINY)


def fake(provider, tflops, N, mode="fwd", status="ok"):
    return bench.Measurement(provider, mode, "float16", 4, 16, N, 128, False, status=status, tflops=tflops)


def test_ratio_table_and_targets():
    results = [
        fake("flashcourse", 300.0, 1024), fake("sdpa-flash", 200.0, 1024), fake("sdpa-cudnn", 500.0, 1024),
        fake("flashcourse", 300.0, 4096), fake("sdpa-flash", 200.0, 4096), fake("sdpa-cudnn", 500.0, 4096),
        fake("flashcourse", 300.0, 8192), fake("sdpa-flash", 200.0, 8192), fake("sdpa-cudnn", None, 8192, status="skipped"),
    ]
    rows = bench.ratio_table(results)
    assert [r["N"] for r in rows] == [1024, 4096, 8192]
    assert rows[0]["sdpa-flash"] == pytest.approx(1.5) and rows[0]["sdpa-cudnn"] == pytest.approx(0.6)
    # fwd targets: >= 1.2x sdpa-flash everywhere, >= 0.8x sdpa-cudnn from N = 4096
    assert [r["meets"] for r in rows] == [True, False, True]
    assert rows[2]["sdpa-cudnn"] is None
    text = bench.format_ratios(rows)
    assert "| fwd | float16 | 128 | no | 4096 | 300 | 1.50 | 0.60 | NO |" in text


def test_cli_writes_csv_json_png(tmp_path, capsys):
    argv = ["bench", "--providers", "naive", "sdpa-math", "--modes", "fwd", "--n", "32", "--d", "16",
            "--batch", "1", "--heads", "1", "--causal", "both", "--warmup", "0", "--rep", "1",
            "--out", str(tmp_path), "--name", "cpu", "--quiet"]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert "naive" in printed and "wrote" in printed
    data = json.loads((tmp_path / "cpu.json").read_text())
    for key in ("device", "driver", "cuda", "torch", "triton", "python", "date", "command"):
        assert key in data["provenance"]
    assert data["provenance"]["command"].startswith("flashcourse bench --providers naive")
    assert len(data["results"]) == 4 and all(r["status"] == "ok" for r in data["results"])
    with open(tmp_path / "cpu.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {r["causal"] for r in rows} == {"True", "False"}
    assert all(float(r["tflops"]) > 0 and r["torch"] == torch.__version__ for r in rows)
    assert (tmp_path / "cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [m.N for m in bench.load(tmp_path / "cpu.json")] == [32, 32, 32, 32]


def test_cli_rejects_bad_sizes(capsys):
    assert bench.main(["--n", "0", "--quiet"]) == 2
    assert "--n takes positive sizes" in capsys.readouterr().err
    assert bench.main(["--batch", "-1", "--quiet"]) == 2
    assert "--batch takes positive sizes" in capsys.readouterr().err


def test_defaults_follow_the_device():
    # on the CPU: toy sizes, B = 128 // N and H = 64 // d
    [m] = bench.benchmark(providers=["naive"], modes=["fwd"], causal=[False], seqlens=[64], progress=False, rep_ms=0)
    assert (m.dtype, m.d, m.B, m.H, m.N, m.status) == ("float32", 32, 2, 2, 64, "ok")
    assert bench.DEFAULTS["cuda"]["tokens"] == 16384 and bench.DEFAULTS["cuda"]["hidden"] == 2048


@pytest.mark.slow
def test_h100_script_runs_every_part_at_toy_sizes(tmp_path):
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "run_h100.py"
    spec = importlib.util.spec_from_file_location("run_h100", path)
    run_h100 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_h100)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run_h100.main([str(tmp_path), "--tiny", "--quiet"]) == 0  # precompiles in 2 processes
    assert not [w for w in caught if "precompiling failed" in str(w.message)]
    data = json.loads((tmp_path / "h100.json").read_text())
    assert data["plan"] == "tiny" and data["provenance"]["command"] == "python3 benchmarks/run_h100.py OUT --tiny"
    assert [r["provider"] for r in data["long_context"]] == run_h100.LONG_PROVIDERS
    assert data["naive_first_oom_N"] == {}  # toy sizes fit
    flash = [r for r in data["results"] if r["provider"] == "flashcourse"]
    assert len(flash) == 2 * 2 * 2 + 1 and all(r["status"] == "ok" for r in flash)
    for name in ("h100.csv", "h100.png", "h100.txt"):
        assert (tmp_path / name).stat().st_size > 0
    summary = (tmp_path / "summary.md").read_text()
    assert "| fwd | float16 | 32 | no | 64 |" in summary and "naive attention, fwd+bwd" in summary
