"""``llumnix-kv``: command-line tools of the data plane."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: llumnix-kv bench [options]   (llumnix-kv bench --help)")
        return 0 if argv else 2
    if argv[0] == "bench":
        from llumnix_kv.bench.kv_bench import main as bench_main

        return bench_main(argv[1:])
    print(f"llumnix-kv: unknown command {argv[0]!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
