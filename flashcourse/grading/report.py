"""The grade report: a text table per exercise, an HTML table for notebooks, and Gradescope JSON."""

import html
import json
import os
import tempfile
from pathlib import Path

COMPACT_LINES = 5  # failure lines per exercise in a compact table (then "+N more")


def _exercises(results):
    """(chapter, exercise, results of its checks), exercises in the order of their first check."""
    groups = {}
    for r in results:
        groups.setdefault((r.chapter, r.exercise), []).append(r)
    for (chapter, exercise), checks in groups.items():
        yield chapter, exercise, checks


def _said(r) -> str:
    """The message of a result, after its status unless the message already says it (no 'not run: not run:')."""
    if r.status in ("failed", "passed") or r.message.startswith(r.status):
        return r.message
    return f"{r.status}: {r.message}"


def total(results) -> tuple:
    """(points earned, points possible)."""
    return sum(r.earned for r in results), sum(r.points for r in results)


def _summary(checks) -> tuple:
    """(status word, failure lines, next hint) of one exercise."""
    missed = [r for r in checks if r.status != "passed"]
    if not missed:
        return "ok", [], ""
    if all(r.status == "not implemented" for r in missed):
        return missed[0].message, [], ""
    if len(missed) == len(checks) and len({r.message for r in missed}) == 1:  # e.g. the file does not import
        return missed[0].message, [], missed[0].hint
    missed = [r for r in missed if r.status != "not implemented"]
    lines = [f"✗ {r.name}: {_said(r)}" for r in missed]
    hint = next((r.hint for r in missed if r.hint), "")
    return f"{len(missed)} of {len(checks)} checks failed", lines, hint


def _shown(failures: list, compact: bool) -> list:
    if not compact or len(failures) <= COMPACT_LINES:
        return failures
    return failures[: COMPACT_LINES - 1] + [f"+{len(failures) - COMPACT_LINES + 1} more"]


def progress_line(checks, width: int = 28) -> str:
    """One line for an exercise that just finished: 'ch02 online_softmax  5/7  2 of 4 checks failed'."""
    earned, possible = total(checks)
    return f"{checks[0].chapter:<8} {checks[0].exercise:<{width}} {f'{earned}/{possible}':>7}  {_summary(checks)[0]}"


def render_text(results, target: Path, *, compact: bool = False) -> str:
    """The table: chapter, exercise, points, status; failure lines (only the first if compact) and a hint."""
    width = max([len(e) for _, e, _ in _exercises(results)] + [8])
    lines = [f"flashcourse grade · target {target}", "",
             f"{'chapter':<8} {'exercise':<{width}} {'points':>7}  status", "-" * (width + 36)]
    for chapter, exercise, checks in _exercises(results):
        earned, possible = total(checks)
        status, failures, hint = _summary(checks)
        lines.append(f"{chapter:<8} {exercise:<{width}} {f'{earned}/{possible}':>7}  {status}")
        for failure in _shown(failures, compact):
            lines.append(f"{'':<10}{failure}")
        if hint:
            lines.append(f"{'':<10}hint: {hint}")
    earned, possible = total(results)
    lines += ["-" * (width + 36), f"{'total':<8} {'':<{width}} {f'{earned}/{possible}':>7}"]
    return "\n".join(lines)


def render_html(results, target: Path) -> str:
    """A compact HTML table for a notebook: one row per exercise, its first failure and next hint."""
    rows = []
    for chapter, exercise, checks in _exercises(results):
        earned, possible = total(checks)
        status, failures, hint = _summary(checks)
        detail = "<br>".join(html.escape(x) for x in [status] + _shown(failures, True) + ([f"hint: {hint}"] if hint else []))
        colour = "#2a2" if earned == possible else ("#c60" if earned else "#c22")
        rows.append(f"<tr><td>{chapter}</td><td><code>{exercise}</code></td>"
                    f"<td style='color:{colour};text-align:right'><b>{earned}/{possible}</b></td>"
                    f"<td style='text-align:left'>{detail}</td></tr>")
    earned, possible = total(results)
    return (f"<div><small>target {html.escape(str(target))}</small><table>"
            "<tr><th>chapter</th><th>exercise</th><th>points</th><th style='text-align:left'>status</th></tr>"
            + "".join(rows) + f"<tr><td><b>total</b></td><td></td><td><b>{earned}/{possible}</b></td><td></td></tr>"
            "</table></div>")


def gradescope(results, target: Path, seconds: float) -> dict:
    """The Gradescope autograder results.json: score, tests[] with name, score, max_score, output."""
    tests = []
    for r in results:
        output = "passed" if r.status == "passed" else _said(r) + (f"\nhint: {r.hint}" if r.hint else "")
        if r.output:
            output += f"\n--- printed by your code ---\n{r.output}"
        tests.append({"name": f"{r.chapter} {r.exercise}: {r.name}", "score": r.earned, "max_score": r.points,
                      "status": "passed" if r.status == "passed" else "failed", "output": output})
    earned, possible = total(results)
    return {"score": earned, "max_score": possible, "execution_time": round(seconds, 2),
            "output": f"flashcourse grade, target {target}", "tests": tests}


def write_json(path, results, target: Path, seconds: float) -> None:
    """Write the Gradescope JSON atomically: a temporary file in the same folder, then os.replace."""
    path = Path(path)
    text = json.dumps(gradescope(results, target, seconds), indent=2) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
