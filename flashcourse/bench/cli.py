"""``flashcourse bench``: the command line over ``make_plan``, ``benchmark`` and ``save``."""

import argparse
import shlex
import sys
from typing import List, Optional, Sequence

from .plan import DEFAULTS, DTYPES, MODES, make_plan
from .providers import PROVIDERS
from .report import format_ratios, format_results, ratio_table, save
from .run import benchmark


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"takes positive whole numbers, got {text!r}")
    return value


def _causal(text: str) -> List[bool]:
    choices = {"no": [False], "yes": [True], "both": [False, True]}
    if text not in choices:
        raise argparse.ArgumentTypeError(f"takes no, yes or both, got {text!r}")
    return choices[text]


def _defaults(key: str) -> str:
    """'[GPU default / CPU default]' for the help text."""
    show = lambda v: " ".join(map(str, v)) if isinstance(v, list) else str(v)  # noqa: E731
    return f"[{show(DEFAULTS['cuda'][key])} / {show(DEFAULTS['cpu'][key])}]"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flashcourse bench",
        description="Time attention implementations side by side: ms, TFLOP/s, peak memory; each checked "
        "against float64 naive attention first. Writes NAME.json, NAME.csv and NAME.png under --out.",
        epilog="Examples:\n"
        "  flashcourse bench --providers flashcourse sdpa-flash sdpa-cudnn --modes fwd bwd --d 64 128\n"
        "  flashcourse bench --providers flashcourse --modes fwd --n 4096 --per-config   (GPU: each launch config)\n"
        "  flashcourse bench --n 64 128 --batch 1 --heads 2 --d 32      (CPU: tiny sizes, interpreted kernels)\n"
        "Defaults in brackets: [on a GPU / on a CPU-only machine].",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--providers", nargs="+", choices=list(PROVIDERS), metavar="P",
                   help=f"any of {', '.join(PROVIDERS)} {_defaults('providers')}")
    p.add_argument("--modes", nargs="+", choices=MODES, help=_defaults("modes"))
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES), help=_defaults("dtypes"))
    p.add_argument("--d", nargs="+", type=_positive, help="head dims " + _defaults("head_dims"))
    p.add_argument("--causal", type=_causal, help="no, yes or both [both]")
    p.add_argument("--n", nargs="+", type=_positive, help="sequence lengths " + _defaults("seqlens"))
    p.add_argument("--batch", type=_positive, help="B [tokens // N]")
    p.add_argument("--heads", type=_positive, help="H [hidden // d]")
    p.add_argument("--tokens", type=_positive, help="B·N when --batch is not given " + _defaults("tokens"))
    p.add_argument("--hidden", type=_positive, help="H·d when --heads is not given " + _defaults("hidden"))
    p.add_argument("--warmup", type=float, help="warm-up per timing, ms " + _defaults("warmup_ms"))
    p.add_argument("--rep", type=float, help="timed repetitions per timing, ms " + _defaults("rep_ms"))
    p.add_argument("--min-runs", type=_positive, help="timed calls per timing on a CPU " + _defaults("min_runs"))
    p.add_argument("--no-check", action="store_true", help="time without checking against the reference")
    p.add_argument("--tol", type=float, help="relative-error limit of the check [by dtype]")
    p.add_argument("--slow-max-n", type=int, default=4096, help="largest N for the tiled provider [4096]")
    p.add_argument("--per-config", action="store_true",
                   help="also time flashcourse with each launch config its autotuner tries (GPU)")
    p.add_argument("--precompile", type=int, default=0, metavar="PROCS",
                   help="compile the Triton kernels of all shapes first, in PROCS parallel processes [0: off]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench-results", help="directory for the files [bench-results]")
    p.add_argument("--name", default="bench", help="file stem: NAME.json, NAME.csv, NAME.png [bench]")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``flashcourse bench``; exit status 1 when a provider failed its check or raised an error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    plan = make_plan(
        providers=a.providers, modes=a.modes, dtypes=a.dtype, head_dims=a.d, causal=a.causal, seqlens=a.n,
        batch=a.batch, heads=a.heads, tokens=a.tokens, hidden=a.hidden, warmup_ms=a.warmup, rep_ms=a.rep,
        min_runs=a.min_runs, check=not a.no_check, tol=a.tol, slow_max_n=a.slow_max_n, per_config=a.per_config,
        precompile_processes=a.precompile, seed=a.seed,
    )
    results = benchmark(plan, progress=not a.quiet)
    print(format_results(results))
    if any(m.provider == "flashcourse" for m in results):
        print("\n" + format_ratios(ratio_table(results)))
    paths = save(results, a.out, a.name, command=shlex.join(["flashcourse", "bench", *argv]), plot_file=not a.no_plot)
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    bad = [m for m in results if m.status in ("failed", "error")]
    if bad:
        print(f"\n{len(bad)} measurement(s) failed or raised: see the status column", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
