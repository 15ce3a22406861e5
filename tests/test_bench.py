"""flashcourse.bench on the test's device: plan, checks before timing, statuses, per-config timing,
timing and memory helpers, files, tables, the command line, old recorded runs, the benchmarks/ scripts."""

import csv
import importlib.util
import json
import warnings
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from flashcourse import bench, naive_attention, viz
from flashcourse.bench import tuning
from flashcourse.cli import main as cli_main

# the benchmarks read and time the autotuner's candidates (conftest.py)
pytestmark = pytest.mark.autotune

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
RECORDED = BENCHMARKS / "results" / "h100.json"


def tiny(device, **options):
    """Toy sizes on ``device``: one shape per causal flag, float32, timed once on the CPU."""
    return dict(seqlens=[32], head_dims=[16], batch=1, heads=2, dtypes=["float32"], warmup_ms=0, rep_ms=1,
                min_runs=1, device=device, progress=False, **options)


def by_name(results, provider, mode="fwd"):
    [m] = [m for m in results if m.provider == provider and m.mode == mode and not m.pinned]
    return m


def script(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def test_plan_takes_the_device_defaults_and_names_what_exists(device):
    plan = bench.make_plan(device=device, seqlens=1024, causal=True)
    default = bench.DEFAULTS[device]
    assert plan.providers == default["providers"] and plan.dtypes == default["dtypes"]
    assert plan.seqlens == [1024] and plan.causal == [True]  # a single value is a list of one
    B, H = bench.default_batch_heads(1024, default["head_dims"][0], default["tokens"], default["hidden"])
    assert plan.shapes()[0] == bench.Shape(default["dtypes"][0], B, H, 1024, default["head_dims"][0], True)
    assert bench.make_plan(device=device, dtypes=[torch.bfloat16]).dtypes == ["bfloat16"]
    with pytest.raises(ValueError, match="sdpa-flash"):
        bench.make_plan(device=device, providers=["flash"])
    with pytest.raises(ValueError, match="fwd"):
        bench.make_plan(device=device, modes=["forward"])
    with pytest.raises(ValueError, match="seqlens takes positive whole numbers"):
        bench.make_plan(device=device, seqlens=[0])
    with pytest.raises(ValueError, match="batch takes positive"):
        bench.make_plan(device=device, batch=0)


def test_wrong_providers_are_flagged_and_the_run_goes_on(device):
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

    extra = dict(wrong_output=wrong_output, wrong_grads=wrong_grads, nan_output=nan_output, oom=out_of_memory,
                 broken=broken)
    results = bench.benchmark(providers=["naive", *extra, "sdpa-cudnn", "sdpa-math"], modes=["fwd", "bwd"],
                              causal=[True], extra_providers=extra, **tiny(device))
    assert len(results) == 2 * (len(extra) + 3)
    for mode in ("fwd", "bwd"):
        for name in ("naive", "sdpa-math"):
            m = by_name(results, name, mode)
            assert m.status == "ok", m.note
            assert m.ms > 0 and m.tflops > 0 and m.max_rel_err < 1e-5  # IEEE float32 (conftest: "highest")
            assert (m.peak_mib is None) == (device == "cpu")  # no allocator to ask on the CPU
        assert by_name(results, "wrong_output", mode).status == "failed"
        assert "NaN or inf" in by_name(results, "nan_output", mode).note
        assert by_name(results, "oom", mode).status == "oom"
        assert by_name(results, "broken", mode).status == "error"
        assert "NotImplementedError" in by_name(results, "broken", mode).note
        cudnn = by_name(results, "sdpa-cudnn", mode)  # no float32 (and no CPU) in cuDNN's attention
        assert cudnn.status == "skipped" and "unavailable" in cudnn.note
    # a forward that is right and a backward that is wrong: timed forward, failed backward naming a gradient
    assert by_name(results, "wrong_grads", "fwd").status == "ok"
    bad = by_name(results, "wrong_grads", "bwd")
    assert bad.status == "failed" and bad.ms is None and bad.note.startswith("wrong d")
    failed = by_name(results, "wrong_output")
    assert failed.ms is None and failed.tflops is None and failed.max_rel_err > 0.1


def test_exceptions_become_statuses_with_reasons():
    class Caught:  # what warnings.catch_warnings(record=True) collects
        def __init__(self, message):
            self.message = message

    # PyTorch on a GPU: the RuntimeError is generic, the warnings say why each backend declined
    caught = [Caught("Flash attention kernel not used because:"),
              Caught("Flash attention requires q,k,v to have head dim <= 256")]
    status, note = bench.classify(RuntimeError("No available kernel. Aborting execution."), caught)
    assert status == "skipped" and "head dim <= 256" in note and "not used because" not in note
    cpu_oom = RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory: "
                           "you tried 64 GB")
    assert bench.classify(cpu_oom)[0] == "oom"
    assert bench.classify(torch.cuda.OutOfMemoryError("CUDA out of memory.\nTried to allocate"))[1] == \
        "OutOfMemoryError: CUDA out of memory."
    assert bench.classify(bench.Unavailable("not built yet")) == ("skipped", "not built yet")
    assert bench.classify(ValueError("q must have 4 dimensions")) == ("error", "ValueError: q must have 4 dimensions")


def test_flashcourse_triton_kernels_checked_and_timed(device):
    # TF32 allowed (on a GPU the kernels' tl.dot follows this, as PyTorch's products do; conftest puts
    # "highest" back): the check's float32 limit, 5e-3, holds for TF32 as for IEEE float32 products
    torch.set_float32_matmul_precision("high")
    results = bench.benchmark(providers=["flashcourse", "tiled"], modes=["fwd+bwd"], causal=[True], **tiny(device))
    for m in results:
        assert m.status == "ok", (m.provider, m.note)
        assert m.max_rel_err <= bench.TOLERANCE[torch.float32] and m.tflops > 0
    # the autotuner's choice is recorded on a GPU; the interpreter does not autotune
    assert (by_name(results, "flashcourse", "fwd+bwd").config == "") == (device == "cpu")


def test_time_budget_and_slow_providers_are_skipped(device):
    results = bench.benchmark(providers=["naive"], modes=["fwd"], time_budget_s=0, **tiny(device))
    assert [m.status for m in results] == ["skipped", "skipped"] and "budget" in results[0].note
    [m] = bench.benchmark(providers=["tiled"], modes=["fwd"], slow_max_n=16, causal=[False], **tiny(device))
    assert m.status == "skipped" and "slow" in m.note


def test_inputs_that_do_not_fit_mark_the_shape_oom(device, monkeypatch):
    def randn(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 512.00 GiB")

    monkeypatch.setattr(torch, "randn", randn)
    results = bench.benchmark(providers=["naive", "sdpa-math"], modes=["fwd", "bwd"], **tiny(device))
    assert len(results) == 8 and {m.status for m in results} == {"oom"}
    assert results[0].note.startswith("allocating the inputs: OutOfMemoryError")


def test_per_config_times_each_candidate_pinned_and_checks_it(device, monkeypatch):
    """The engine's side of per-config timing, with the kernels' side replaced: one row per candidate,
    measured while that config is pinned, and checked like any other (a wrong config fails)."""
    good = triton.Config({"BLOCK_M": 64}, num_warps=4, num_stages=2)
    bad = triton.Config({"BLOCK_M": 16}, num_warps=1, num_stages=1)
    active = []

    class Pin:
        def __init__(self, kernel, config):
            self.config = config

        def __enter__(self):
            active.append(self.config)

        def __exit__(self, *exc):
            active.pop()

    def flashcourse(q, k, v, causal):  # wrong whenever the bad config is pinned
        o = naive_attention(q, k, v, causal=causal)
        return o.flip(-2) if active and active[-1] is bad else o

    monkeypatch.setattr(tuning, "candidates", lambda run_once: (run_once(), {"forward": [good, bad]})[1])
    monkeypatch.setattr(tuning, "pinned", Pin)
    results = bench.benchmark(providers=["flashcourse"], modes=["fwd"], causal=[False], per_config=True,
                              extra_providers={"flashcourse": flashcourse}, **tiny(device))
    auto, pinned_good, pinned_bad = results
    assert not auto.pinned and auto.status == "ok"
    assert pinned_good.pinned and pinned_good.config == "forward: BLOCK_M=64 warps=4 stages=2"
    assert pinned_good.status == "ok" and pinned_good.ms > 0
    assert pinned_bad.status == "failed" and pinned_bad.config.startswith("forward: BLOCK_M=16")
    assert [r["N"] for r in bench.ratio_table(results)] == [32]  # pinned rows are not compared
    assert "[forward: BLOCK_M=16 warps=1 stages=1]" in bench.format_results(results)


def test_the_kernels_autotuners_are_where_tuning_looks(device):
    """tuning.autotuners is the one place that names kernel internals: it must find them, and listing the
    candidates must leave the autotuners as they were."""
    tuners = tuning.autotuners()
    assert set(tuners) == {"forward", "dkdv", "dq"}
    for t in tuners.values():
        assert t.configs and all(isinstance(c, triton.Config) for c in t.configs)
    before = {name: (t.cache, t.early_config_prune, t.configs) for name, t in tuners.items()}
    q = torch.randn(1, 2, 64, 16, device=device, dtype=torch.float16)
    step = bench.make_step(bench.PROVIDERS["flashcourse"], q, q, q, True, "fwd+bwd")
    found = tuning.candidates(step)
    assert before == {name: (t.cache, t.early_config_prune, t.configs) for name, t in tuners.items()}
    # the interpreter runs one fixed config per kernel: nothing to choose from
    assert set(found) == (set() if device == "cpu" else {"forward", "dkdv", "dq"})


@triton.autotune(configs=[triton.Config({"BLOCK": b}) for b in (16, 32, 64)], key=["n"],
                 prune_configs_by={"early_config_prune": lambda configs, named_args, **kwargs: configs[:2]})
@triton.jit
def _write_block_size(out, n, BLOCK: tl.constexpr):
    """out[:n] = BLOCK: which config ran."""
    offs = tl.arange(0, BLOCK)
    tl.store(out + offs, tl.full((BLOCK,), BLOCK, tl.int32), mask=offs < n)


def test_candidates_and_pinning_with_a_real_autotuner(device, monkeypatch):
    """tuning.candidates and tuning.pinned on a triton.autotune object: the candidates are what its
    pruner keeps, a pinned config is the one that runs, and the autotuner is left as it was."""
    monkeypatch.setattr(tuning, "autotuners", lambda: {"write": _write_block_size})
    out = torch.zeros(8, dtype=torch.int32, device=device)
    configs, prune = _write_block_size.configs, _write_block_size.early_config_prune
    found = tuning.candidates(lambda: _write_block_size[(1,)](out, 8))
    assert [c.kwargs["BLOCK"] for c in found["write"]] == [16, 32] and out[0].item() == 16
    with tuning.pinned("write", configs[2]):
        _write_block_size[(1,)](out, 8)
    assert out[0].item() == 64
    assert (_write_block_size.configs, _write_block_size.early_config_prune, _write_block_size.cache) == \
        (configs, prune, {})


@pytest.mark.gpu
def test_per_config_on_the_gpu():
    """Every candidate config of the forward, dK/dV and dQ kernels is timed pinned, and passes the check."""
    results = bench.benchmark(providers=["flashcourse"], modes=["fwd", "bwd"], dtypes=["float16"], head_dims=[64],
                              causal=[True], seqlens=[256], batch=1, heads=2, per_config=True, warmup_ms=1,
                              rep_ms=5, progress=False)
    pinned = [m for m in results if m.pinned]
    assert {m.config.split(":")[0] for m in pinned} == {"forward", "dkdv", "dq"}
    assert len({m.config for m in pinned}) == len(pinned) >= 3
    assert all(m.status == "ok" and m.ms > 0 for m in results), bench.format_results(results)
    assert by_name(results, "flashcourse", "bwd").config.startswith("dkdv: BLOCK_M=")


def test_time_ms_median_of_at_least_ten_runs(device):
    calls = []
    x = torch.randn(64, 64, device=device)
    threads = torch.get_num_threads()
    ms = bench.time_ms(lambda: calls.append(x @ x), device, warmup_ms=0, rep_ms=0)
    assert ms > 0 and torch.get_num_threads() == threads
    if device == "cpu":
        assert len(calls) >= 1 + bench.measure.CPU_MIN_RUNS  # a warm-up call, then at least 10 timed
        assert bench.time_ms(lambda: None) >= 0  # the default device here is the CPU


def test_peak_memory_is_the_one_viz_uses(device):
    assert viz.peak_memory is bench.peak_memory

    def holds_a_mebibyte(x, *, scale):
        big = torch.ones(2**18, device=x.device)  # 1 MiB of float32, freed before returning
        return x * scale + big.sum()

    x = torch.zeros(4, device=device)
    out, peak = bench.peak_memory(holds_a_mebibyte, x, scale=2.0)
    assert out.tolist() == [2.0**18] * 4
    assert 2**20 <= peak < 2**20 + 2**16


def fake(provider, tflops, N, mode="fwd", status="ok", pinned=False):
    return bench.Measurement(provider, mode, "float16", 4, 16, N, 128, False, status=status, tflops=tflops,
                             pinned=pinned)


def test_ratio_table():
    results = [
        fake("flashcourse", 300.0, 1024), fake("sdpa-flash", 200.0, 1024), fake("sdpa-cudnn", 500.0, 1024),
        fake("flashcourse", 900.0, 1024, pinned=True),
        fake("flashcourse", 300.0, 8192), fake("sdpa-flash", 200.0, 8192),
        fake("sdpa-cudnn", None, 8192, status="skipped"),
    ]
    rows = bench.ratio_table(results)
    assert [r["N"] for r in rows] == [1024, 8192]
    assert rows[0]["sdpa-flash"] == pytest.approx(1.5) and rows[0]["sdpa-cudnn"] == pytest.approx(0.6)
    assert rows[1]["sdpa-cudnn"] is None
    assert "| fwd | float16 | 128 | no | 1024 | 300 | 1.50 | 0.60 |" in bench.format_ratios(rows)


def test_cli_writes_csv_json_png(tmp_path, capsys):
    argv = ["bench", "--providers", "naive", "sdpa-math", "--modes", "fwd", "--n", "32", "--d", "16",
            "--batch", "1", "--heads", "1", "--causal", "both", "--warmup", "0", "--rep", "1",
            "--out", str(tmp_path), "--name", "cpu", "--quiet"]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert "naive" in printed and "wrote" in printed
    data = json.loads((tmp_path / "cpu.json").read_text())
    for key in ("device", "driver", "cuda", "torch", "triton", "python", "date", "command", "git_commit",
                "float32_matmul_precision"):
        assert key in data["provenance"]
    assert data["provenance"]["command"].startswith("flashcourse bench --providers naive")
    assert len(data["results"]) == 4 and all(r["status"] == "ok" for r in data["results"])
    with open(tmp_path / "cpu.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {r["causal"] for r in rows} == {"True", "False"}
    assert all(float(r["tflops"]) > 0 and r["torch"] == torch.__version__ and r["command"] for r in rows)
    assert (tmp_path / "cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [m.N for m in bench.load(tmp_path / "cpu.json")] == [32, 32, 32, 32]


@pytest.mark.parametrize("flag", ["--n", "--batch"])
def test_cli_rejects_bad_sizes(flag, capsys):
    with pytest.raises(SystemExit) as stop:
        bench.main([flag, "0", "--quiet"])
    assert stop.value.code == 2
    assert f"argument {flag}: takes positive whole numbers, got '0'" in capsys.readouterr().err


def test_card_names():
    card = bench.report.card_name
    assert card("NVIDIA H100 80GB HBM3") == "h100" and card("NVIDIA H200") == "h200"
    assert card("NVIDIA A100-SXM4-80GB") == "a100" and card("Tesla T4") == "t4"
    assert card("CPU (x86_64)") == "cpu"


def test_the_recorded_run_still_loads_and_the_targets_script_reads_it(capsys):
    """benchmarks/results/h100.json (written by an earlier version) loads, tabulates and plots, and
    check_targets finds the one row of that run that missed issue 7's targets."""
    recorded = json.loads(RECORDED.read_text())
    results = bench.load(RECORDED)
    assert len(results) == len(recorded["results"]) and not any(m.pinned for m in results)
    assert "| fwd | float16 | 64 | no | 1024 | 364.6 | 1.27 | 0.84 |" in bench.format_ratios(recorded["ratios"])
    assert bench.ratio_table(results)[0]["sdpa-flash"] == pytest.approx(recorded["ratios"][0]["sdpa-flash"])
    assert bench.plot([m for m in results if m.mode == "fwd" and m.d == 64]).axes
    assert script("check_targets").main([str(RECORDED), "--issue", "7"]) == 1
    printed = capsys.readouterr().out
    assert "| fwd | float16 | 128 | yes | 1024 | 1.07 | 0.63 | NO |" in printed
    assert printed.count("| NO |") == 1 and "peak 1.006× the IO bytes (target ≤ 1.25): met" in printed


@pytest.mark.slow
def test_record_script_runs_every_part_at_toy_sizes(tmp_path):
    record = script("record")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert record.main([str(tmp_path), "--tiny", "--quiet", "--precompile", "1", "--name", "toy"]) == 0
    assert not [w for w in caught if "precompiling failed" in str(w.message)]
    data = json.loads((tmp_path / "toy.json").read_text())
    assert data["plan"] == "tiny" and data["provenance"]["command"] == "python3 benchmarks/record.py OUT --tiny"
    assert [r["provider"] for r in data["long_context"]] == record.LONG_PROVIDERS
    assert data["naive_first_oom_N"] == {}  # toy sizes fit
    flash = [r for r in data["results"] if r["provider"] == "flashcourse"]
    assert len(flash) == 2 * 2 * 2 + 1 and all(r["status"] == "ok" for r in flash)
    for name in ("toy.csv", "toy.png", "toy.txt"):
        assert (tmp_path / name).stat().st_size > 0
    summary = (tmp_path / "summary.md").read_text()
    assert "| fwd | float16 | 32 | no | 64 |" in summary and "naive attention, fwd+bwd" in summary
