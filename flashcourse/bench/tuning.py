"""Per-config timing: flashcourse with each launch config its autotuner tries, pinned one at a time.

On a GPU, ``triton.autotune`` times a few candidate configs (B_r, B_c, warps, stages, descriptor or
pointer loads) once per key and keeps the fastest. To see why it chose one, the benchmark lists the
candidates each kernel tries for a shape (``candidates``) and times the whole call with each pinned
(``pinned``), checked like any other measurement. In the CPU interpreter nothing is autotuned, so
there are no candidates. ``autotuners`` is the one place that reaches into ``flashcourse.kernels``.
"""

from contextlib import contextmanager
from typing import Callable, Dict, List

from .._env import INTERPRET

MODE_KERNELS = {"fwd": ["forward"], "bwd": ["dkdv", "dq"], "fwd+bwd": ["forward", "dkdv", "dq"]}


def autotuners() -> Dict[str, object]:
    """The ``triton.autotune`` objects of the kernels, by name (the only access to kernel internals)."""
    from ..kernels import backward, configs, forward  # noqa: F401  (importing the kernels registers them)

    return {name: configs.AUTOTUNERS[name] for name in ("forward", "dkdv", "dq")}


def label(kernel: str, config) -> str:
    """``forward: BLOCK_M=128 BLOCK_N=64 USE_TMA=True warps=4 stages=3``."""
    params = " ".join(f"{key}={value}" for key, value in config.kwargs.items())
    return f"{kernel}: {params} warps={config.num_warps} stages={config.num_stages}"


def candidates(run_once: Callable[[], object]) -> Dict[str, List]:
    """The configs each autotuned kernel would try for the inputs of ``run_once()``, which launches them.

    Each autotuner's pruner is wrapped to record what it keeps, and its cache is emptied so that it
    prunes again; both are restored afterwards, so the autotuner's own choices stand. A kernel with
    one config (or none autotuned, as in the interpreter) is not listed.
    """
    found: Dict[str, List] = {}
    tuners = autotuners()
    saved = {name: (t.cache, t.early_config_prune) for name, t in tuners.items()}

    def recorder(name, prune):
        def record(configs, named_args, **kwargs):
            found[name] = list(prune(configs, named_args, **kwargs) if prune else configs)
            return found[name][:1]  # launch one: the candidates are all we want here

        return record

    try:
        for name, t in tuners.items():
            t.cache, t.early_config_prune = {}, recorder(name, t.early_config_prune)
        run_once()
    finally:
        for name, t in tuners.items():
            t.cache, t.early_config_prune = saved[name]
    return found


@contextmanager
def pinned(kernel: str, config):
    """Within the block, ``kernel`` launches with ``config`` only (an autotuner with one config does not tune)."""
    tuner = autotuners()[kernel]
    saved = tuner.configs
    tuner.configs = [config]
    try:
        yield
    finally:
        tuner.configs = saved


def chosen(mode: str) -> str:
    """The configs the kernels of ``mode`` launched last ("; "-separated): after a plain call, the
    autotuner's choice for its inputs. "" in the interpreter, which does not autotune."""
    if INTERPRET:
        return ""
    tuners = autotuners()
    launched = [(name, getattr(tuners[name], "best_config", None)) for name in MODE_KERNELS[mode]]
    return "; ".join(label(name, config) for name, config in launched if config is not None)
