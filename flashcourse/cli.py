"""The ``flashcourse`` command: ``doctor`` (check the set-up), ``grade`` (score exercises), ``bench`` (time kernels)."""

import argparse
import sys

COMMANDS = {
    "doctor": "check Python, torch, Triton and the device, and launch a tiny kernel",
    "grade": "grade the exercises (run `flashcourse grade --help`)",
    "bench": "time the attention implementations side by side (run `flashcourse bench --help`)",
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        prog="flashcourse",
        description="FlashAttention, built step by step.",
        epilog="\n".join(f"  {name:<8} {text}" for name, text in COMMANDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=COMMANDS, metavar="COMMAND", help="one of: " + ", ".join(COMMANDS))
    ns = parser.parse_args(argv[:1])
    rest = argv[1:]
    if ns.command == "doctor":
        from .doctor import main as doctor

        return doctor()
    if ns.command == "grade":
        from .grading.cli import main as grade

        return grade(rest)
    from .bench import main as bench

    return bench(rest)


if __name__ == "__main__":
    sys.exit(main())
