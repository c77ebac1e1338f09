"""``python -m tests.golden [case ...]``: run the golden cases and rewrite their files."""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from tests.golden import CASES, dump, golden_path, machine, run_case


def main(argv: list[str]) -> int:
    names = argv or list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        print(f"error: unknown golden case {unknown[0]!r}; cases: {', '.join(CASES)}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            got = run_case(name, Path(tmp) / name, Path(tmp) / "cache")
            golden_path(name).write_text(dump({"machine": machine(), **got}))
            s = got["summary"]
            print(f"{name:34s} system {s['system_accuracy']:.4f}  defer {s['defer_rate']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
