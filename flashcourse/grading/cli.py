"""``flashcourse grade [CHAPTER ...] [--target exercises|solutions|PATH] [--json FILE]``.

Exit status 0 whenever the grading ran, whatever the score; 2 when it could not run (no such target
folder or chapter) or could not write the JSON report.
"""

import argparse
import sys
import time

from .framework import CHAPTERS
from .report import render_text, write_json
from .runner import TargetError, grade, resolve_target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="flashcourse grade",
        description="Grade the exercises against the finished flashcourse package.",
        epilog="examples:\n  flashcourse grade                 every chapter of exercises/\n"
               "  flashcourse grade ch02 3          chapters 02 and 03\n"
               "  flashcourse grade --target ~/submissions/alice --json results.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("chapters", nargs="*", metavar="CHAPTER",
                        help=f"chapters to grade (e.g. ch02 or 2; default all: {', '.join(CHAPTERS)})")
    parser.add_argument("--target", default=None,
                        help="exercises (default, or $FLASHCOURSE_TARGET), solutions, or a folder with the chapter files")
    parser.add_argument("--json", metavar="FILE", help="also write a Gradescope results.json to FILE")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="time limit of each check (default 60)")
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    start = time.perf_counter()
    try:
        target = resolve_target(args.target)
        results = grade(args.chapters or None, target, timeout=args.timeout)
    except (TargetError, ValueError) as e:
        print(f"flashcourse grade: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    print(render_text(results, target))
    print(f"({seconds:.1f} s)")
    if args.json:
        try:
            write_json(args.json, results, target, seconds)
        except OSError as e:
            print(f"flashcourse grade: could not write the JSON report: {e}", file=sys.stderr)
            return 2
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
