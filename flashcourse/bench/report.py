"""What a run leaves behind: provenance, files (JSON, CSV, PNG), tables and the figure.

Every saved result says where and with what it was measured (``provenance``: device, driver, CUDA,
torch, triton, git commit, date, command line). ``load`` reads the measurements of any JSON that
``save`` wrote, including those of earlier versions (fields added since take their defaults).
"""

import csv
import datetime
import json
import math
import platform
import re
import shlex
import subprocess
import sys
from dataclasses import asdict, fields
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from .plan import Measurement

CSV_PROVENANCE = ("device", "driver", "cuda", "torch", "triton", "git_commit", "date", "command")
BASELINES = ("sdpa-flash", "sdpa-cudnn")


def provenance(command: Optional[str] = None) -> dict:
    """Where and with what the numbers were taken; ``command`` defaults to this process's ``sys.argv``."""
    import triton

    from .._env import INTERPRET

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command if command is not None else shlex.join(sys.argv),
        "git_commit": _first_line(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"]),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "triton_interpreter": bool(INTERPRET),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    if not torch.cuda.is_available():
        return {**info, "device": f"CPU ({platform.processor() or platform.machine()})", "cuda": None, "driver": None}
    p = torch.cuda.get_device_properties(0)
    return {**info, "device": p.name, "compute_capability": f"{p.major}.{p.minor}",
            "gpu_memory_gib": round(p.total_memory / 2**30, 1), "sm_count": p.multi_processor_count,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "driver": _first_line(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])}


def card_name(device: str) -> str:
    """A short file-name stem for a device name: "NVIDIA H100 80GB HBM3" -> "h100", "CPU (x86_64)" -> "cpu"."""
    model = re.search(r"\b([A-Z]{1,2}\d{1,4}[A-Z]?)\b", device)
    if device.startswith("CPU") or model is None:
        return "cpu" if device.startswith("CPU") else re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    return model.group(1).lower()


def _first_line(cmd: List[str]) -> Optional[str]:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0] if out else None


def save(results: Sequence[Measurement], out_dir, name: str = "bench", command: Optional[str] = None,
         extra: Optional[dict] = None, plot_file: bool = True) -> Dict[str, Path]:
    """Write ``name``.json (provenance, ``extra``, results, ratios), ``name``.csv and ``name``.png under
    ``out_dir``; return the paths by kind."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prov = provenance(command)
    rows = [asdict(m) for m in results]
    paths = {"json": out / f"{name}.json", "csv": out / f"{name}.csv"}
    payload = {"provenance": prov, **(extra or {}), "results": rows, "ratios": ratio_table(results)}
    paths["json"].write_text(json.dumps(payload, indent=1, default=str) + "\n")
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[fl.name for fl in fields(Measurement)] + list(CSV_PROVENANCE))
        writer.writeheader()
        writer.writerows({**row, **{key: prov.get(key) for key in CSV_PROVENANCE}} for row in rows)
    if plot_file:
        paths["png"] = out / f"{name}.png"
        plot(results, title=_title(prov)).savefig(paths["png"], dpi=110)
    return paths


def _title(prov: dict) -> str:
    commit = (prov.get("git_commit") or "")[:7]
    return f"{prov['device']} · torch {prov['torch']} · triton {prov['triton']} · {prov['date'][:10]}" + \
        (f" · {commit}" if commit else "")


def load(path) -> List[Measurement]:
    """The measurements of a JSON file written by ``save`` (of this version or an earlier one)."""
    known = {fl.name for fl in fields(Measurement)}
    rows = json.loads(Path(path).read_text())["results"]
    return [Measurement(**{key: value for key, value in row.items() if key in known}) for row in rows]


def plot(results: Sequence[Measurement], title: str = ""):
    """TFLOP/s against N, one line per provider, one panel per (mode, dtype, d, causal); returns the Figure.

    Per-config (pinned) measurements are left out.
    """
    from matplotlib.figure import Figure

    panels: Dict[tuple, List[Measurement]] = {}
    for m in results:
        if not m.pinned:
            panels.setdefault((m.mode, m.dtype, m.d, m.causal), []).append(m)
    ncols = min(4, max(1, len(panels)))
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig = Figure(figsize=(4.2 * ncols, 3.3 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    colors = {p: f"C{i}" for i, p in enumerate(dict.fromkeys(m.provider for m in results))}
    for ax, ((mode, dtype, d, causal), ms) in zip(axes, panels.items()):
        for provider, color in colors.items():
            points = sorted((m.N, m.tflops) for m in ms if m.provider == provider and m.status == "ok")
            if points:
                ax.plot(*zip(*points), marker="o", color=color, label=provider)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{mode} · {dtype} · d={d}{' · causal' if causal else ''}", fontsize=9)
        ax.set_xlabel("N (sequence length)")
        ax.set_ylabel("TFLOP/s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def fmt_value(x, spec: str, width: int = 0) -> str:
    """``x`` formatted with ``spec``, or n/a, right-aligned in ``width`` characters."""
    return format("n/a" if x is None else format(x, spec), f">{width}")


def format_results(results: Sequence[Measurement]) -> str:
    """A plain-text table of the measurements (ms, TFLOP/s, peak memory, status; the config when pinned)."""
    head = f"{'provider':<19}{'mode':<8}{'dtype':<9}{'B':>4}{'H':>4}{'N':>7}{'d':>5} {'causal':<7}" \
           f"{'ms':>10} {'TFLOP/s':>9}{'peak MiB':>10}  status"
    lines = [head, "-" * len(head)]
    for m in results:
        status = m.status if not m.note else _shorten(f"{m.status}: {m.note}", 120)
        lines.append(
            f"{m.provider:<19}{m.mode:<8}{m.dtype:<9}{m.B:>4}{m.H:>4}{m.N:>7}{m.d:>5} {str(m.causal):<7}"
            f"{fmt_value(m.ms, '.3f', 10)} {fmt_value(m.tflops, '.4g', 9)}{fmt_value(m.peak_mib, '.0f', 10)}  {status}"
            + (f"  [{m.config}]" if m.pinned else "")
        )
    return "\n".join(lines)


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def ratio_table(results: Sequence[Measurement], provider: str = "flashcourse",
                baselines: Sequence[str] = BASELINES) -> List[dict]:
    """Per (mode, dtype, d, causal, N, B, H): ``provider``'s TFLOP/s over each baseline's (None if either
    is missing or not ok). Per-config (pinned) measurements are left out."""
    by_key = {(m.provider, m.mode, m.dtype, m.d, m.causal, m.N, m.B, m.H): m for m in results if not m.pinned}
    rows = []
    for (p, *key), m in by_key.items():
        if p != provider:
            continue
        row = dict(zip(("mode", "dtype", "d", "causal", "N", "B", "H"), key), tflops=m.tflops)
        for base in baselines:
            b = by_key.get((base, *key))
            row[base] = m.tflops / b.tflops if m.status == "ok" and b is not None and b.status == "ok" else None
        rows.append(row)
    return rows


def format_ratios(rows: Sequence[dict], baselines: Sequence[str] = BASELINES) -> str:
    """The ratio table as Markdown."""
    cols = ["mode", "dtype", "d", "causal", "N", "TFLOP/s"] + [f"/ {b}" for b in baselines]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        causal = "yes" if r["causal"] else "no"
        cells = [r["mode"], r["dtype"], str(r["d"]), causal, str(r["N"]), fmt_value(r["tflops"], ".4g")]
        lines.append("| " + " | ".join(cells + [fmt_value(r.get(b), ".2f") for b in baselines]) + " |")
    return "\n".join(lines)
