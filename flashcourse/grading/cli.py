"""``flashcourse grade [CHAPTER ...] [--target exercises|solutions|PATH] [--json FILE] [--worker-user USER]``.

Prints a line per exercise as it finishes, then the table. Exit status 0 whenever the grading ran,
whatever the score; 2 when it could not run (no such target folder, chapter or user) or could not
write the JSON report; 130 after Ctrl-C (the table of what finished is printed, no JSON is written).
The JSON report is written atomically, after every process the learner's code started is dead.
"""

import argparse
import math
import os
import sys
import time

from .procs import make_undumpable
from .report import progress_line, render_text, write_json
from .runner import DEFAULT_TIMEOUT, GradingInterrupted, TargetError, grade, resolve_target


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def _worker_user(name):
    """None when not given; else the name, once the grader can run code as that user."""
    if name is None:
        return None
    try:
        import pwd

        pwd.getpwnam(name)
    except ImportError:
        raise TargetError("--worker-user works on Linux and macOS only") from None
    except KeyError:
        raise TargetError(f"--worker-user: there is no user named {name!r} on this machine") from None
    if os.geteuid() != 0:
        raise TargetError(f"--worker-user needs the grader to run as root (it runs as uid {os.geteuid()}); "
                          f"run without it to grade as the current user")
    return name


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="flashcourse grade",
        description="Grade the exercises against the finished flashcourse package.",
        epilog="examples:\n  flashcourse grade                 every chapter of exercises/\n"
               "  flashcourse grade ch02 3          chapters 02 and 03\n"
               "  flashcourse grade --target ~/submissions/alice --json results.json\n"
               "  flashcourse grade --target /autograder/submission --worker-user student "
               "--json /autograder/results/results.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("chapters", nargs="*", metavar="CHAPTER",
                        help="chapters to grade (e.g. ch02 or 2; default all)")
    parser.add_argument("--target", default=None,
                        help="exercises (default, or $FLASHCOURSE_TARGET), solutions, or a folder with the chapter files")
    parser.add_argument("--json", metavar="FILE", help="also write a Gradescope results.json to FILE")
    parser.add_argument("--timeout", type=_seconds, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help=f"time limit of each check in seconds of the worker's CPU time, wall time three times "
                             f"that (default {DEFAULT_TIMEOUT:g})")
    parser.add_argument("--worker-user", metavar="USER",
                        help="run the learner's code as this user (the grader must run as root, as on Gradescope)")
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    make_undumpable()  # the learner's code (same user) can then neither read nor trace the grader's memory
    start = time.perf_counter()
    try:
        target = resolve_target(args.target)
        user = _worker_user(args.worker_user)
        if os.name == "posix" and os.geteuid() == 0 and user is None:
            print("flashcourse grade: running as root, so the learner's code runs as root too; "
                  "pass --worker-user USER to run it as another user", file=sys.stderr)
        results = grade(args.chapters or None, target, timeout=args.timeout, worker_user=user,
                        progress=lambda checks: print(progress_line(checks), flush=True))
    except (TargetError, ValueError) as e:
        print(f"flashcourse grade: {e}", file=sys.stderr)
        return 2
    except GradingInterrupted as e:
        print(f"\n{render_text(e.results, target)}\n(interrupted after {time.perf_counter() - start:.1f} s: "
              f"the table shows the checks that finished; no JSON report was written)")
        return 130
    seconds = time.perf_counter() - start
    print()
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
