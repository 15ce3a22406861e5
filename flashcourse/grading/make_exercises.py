"""Generate exercises/ from solutions/: every ``### BEGIN SOLUTION`` … ``### END SOLUTION`` block
becomes a stub that raises ``NotImplementedError("chNN.<function>: not implemented yet")``.

    python -m flashcourse.grading.make_exercises            # write exercises/, never over your work
    python -m flashcourse.grading.make_exercises --force    # first move changed files to exercises/.backup/
    python -m flashcourse.grading.make_exercises --out DIR  # fresh stubs in DIR (e.g. to compare with yours)
    python -m flashcourse.grading.make_exercises --check    # exit 1 if the stubs last written are not current

``exercises/.manifest.json`` holds the SHA-256 of each file as this tool last wrote it. A file that
differs from that is the learner's work: it is only replaced with ``--force``, which first moves it
to ``exercises/.backup/<time>/`` (git-ignored, never graded).
"""

import argparse
import hashlib
import json
import re
import shutil
import sys
import time
from pathlib import Path

from .framework import stub_message

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
HEADER = "# Your exercises: replace each stub, then run `flashcourse grade {chapter}`. Generated from solutions/.\n"
DEF = re.compile(r"^(\s*)(?:async\s+)?(def|class)\s+(\w+)")
MANIFEST, BACKUP = ".manifest.json", ".backup"


def _enclosing(lines: list, index: int, indent: int) -> str:
    """The dotted name of the def (and class) that contain line ``index`` indented by ``indent``."""
    names = []
    for line in reversed(lines[:index]):
        m = DEF.match(line)
        if m and len(m.group(1)) < indent:
            names.append(m.group(3))
            indent = len(m.group(1))
    if not names:
        raise ValueError(f"line {index + 1}: a solution block must sit inside a function")
    return ".".join(reversed(names))


def make_exercise(source: str, chapter: str) -> str:
    """The exercise file of a solution file's text."""
    lines = source.splitlines(keepends=True)
    out, i = [HEADER.format(chapter=chapter)], 0
    while i < len(lines):
        if lines[i].strip() != BEGIN:
            out.append(lines[i])
            i += 1
            continue
        indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == END), None)
        if end is None:
            raise ValueError(f"line {i + 1}: {BEGIN} without {END}")
        name = _enclosing(lines, i, len(indent))
        out.append(f'{indent}raise NotImplementedError("{stub_message(name, chapter)}")\n')
        i = end + 1
    return "".join(out)


def generate(solutions: Path) -> dict:
    """{file name: exercise text} for every graded chapter that has a file in ``solutions``."""
    from .checks import all_chapters

    files = {}
    for chapter, checks in all_chapters().items():
        path = solutions / f"{checks.file}.py"
        if path.is_file():
            files[path.name] = make_exercise(path.read_text(), chapter)
    return files


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def read_manifest(folder: Path) -> dict:
    try:
        data = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write(exercises: Path, files: dict, *, force: bool = False) -> tuple:
    """Write ``files`` into ``exercises`` without losing a learner's change; (written, kept, moved, backup)."""
    manifest = read_manifest(exercises)
    written, kept, moved = [], [], []
    backup = exercises / BACKUP / time.strftime("%Y%m%d-%H%M%S")
    exercises.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        path = exercises / name
        current = path.read_text() if path.is_file() else None
        if current == text:
            manifest[name] = digest(text)
            continue
        if current is not None and digest(current) != manifest.get(name):  # the learner's work
            if not force:
                kept.append(name)
                continue
            backup.mkdir(parents=True, exist_ok=True)
            shutil.move(str(path), str(backup / name))
            moved.append(name)
        path.write_text(text)
        manifest[name] = digest(text)
        written.append(name)
    (exercises / MANIFEST).write_text(json.dumps(dict(sorted(manifest.items())), indent=2) + "\n")
    return written, kept, moved, backup


def main(argv=None) -> int:
    from .runner import REPO_ROOT

    parser = argparse.ArgumentParser(prog="python -m flashcourse.grading.make_exercises",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="only report whether the stubs last written (the manifest) match solutions/")
    parser.add_argument("--force", action="store_true",
                        help=f"replace changed exercise files too, after moving them to exercises/{BACKUP}/")
    parser.add_argument("--out", metavar="DIR", help="write fresh stubs into DIR instead (no manifest, nothing moved)")
    args = parser.parse_args(argv)
    solutions, exercises = REPO_ROOT / "solutions", REPO_ROOT / "exercises"
    if not solutions.is_dir():
        print(f"make_exercises: {solutions} not found: the stubs are generated from solutions/", file=sys.stderr)
        return 2
    files = generate(solutions)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (out / name).write_text(text)
        print(f"{out}: {len(files)} fresh exercise files written")
        return 0
    if args.check:
        manifest = read_manifest(exercises)
        stale = [name for name, text in files.items() if manifest.get(name) != digest(text)]
        print(f"exercises/: {', '.join(stale) if stale else 'nothing'} out of date"
              + (": run python -m flashcourse.grading.make_exercises" if stale else ""))
        return 1 if stale else 0
    written, kept, moved, backup = write(exercises, files, force=args.force)
    print(f"exercises/: {', '.join(written) if written else 'nothing'} written")
    if moved:
        print(f"your previous {', '.join(moved)} moved to {backup}")
    if kept:
        print(f"exercises/: not overwritten, because you changed them: {', '.join(kept)}; rerun with --force to "
              f"move them to exercises/{BACKUP}/ first, or use --out DIR for fresh copies elsewhere", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
