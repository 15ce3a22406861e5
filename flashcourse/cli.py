"""The ``flashcourse`` command: ``doctor`` (check the set-up), ``grade`` (score exercises), ``bench`` (time kernels).

``python -m flashcourse`` is the same command. Each subcommand parses its own options (``--help``).
An unexpected error is reported in one line, not as a traceback; ``FLASHCOURSE_TRACEBACK=1`` shows it.
"""

import argparse
import os
import sys

COMMANDS = {
    "doctor": "check Python, the platform, torch, Triton and the device, and launch a tiny kernel",
    "grade": "grade the exercises (run `flashcourse grade --help`)",
    "bench": "time the attention implementations side by side (run `flashcourse bench --help`)",
}


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="flashcourse",
        usage="flashcourse [--version] [--help] COMMAND [options]",
        description="FlashAttention, built step by step.",
        epilog="commands:\n" + "\n".join(f"  {name:<8} {text}" for name, text in COMMANDS.items())
               + "\n\n`flashcourse COMMAND --help` describes the options of a command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"flashcourse {__version__}")
    parser.add_argument("command", choices=COMMANDS, metavar="COMMAND", help="one of: " + ", ".join(COMMANDS))
    return parser


def _run(command: str, argv: list) -> int:
    if command == "doctor":
        from .doctor import main
    elif command == "grade":
        from .grading.cli import main
    else:
        from .bench import main
    return main(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    if not argv:
        parser.print_help()
        return 0
    command = parser.parse_args(argv[:1]).command
    try:
        return _run(command, argv[1:])
    except KeyboardInterrupt:
        print(f"\nflashcourse {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("FLASHCOURSE_TRACEBACK") == "1":
            raise
        print(f"flashcourse {command}: {type(exc).__name__}: {exc}\n"
              f"(to see where it happened: FLASHCOURSE_TRACEBACK=1 flashcourse {' '.join(argv)})", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
