"""``python -m benchmarks run``: the CPU suite, its JSON and plots, and the README's tables.

    python -m benchmarks run --quick          # small sizes, minutes on 2 cores
    python -m benchmarks run                  # the full sizes
    python -m benchmarks run --only method_step --check   # exit 1 if a target is missed

Every benchmark writes ``benchmarks/results/<name>.json`` (machine, versions, date, commit) and a
PNG, and rewrites its table between ``<!-- benchmark:<name> -->`` markers in the README.
Timings are not tests: ``--check`` is for people comparing runs, not for CI.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

from benchmarks.suite import TABLE_PAGES, show, update_readme, write

BENCHMARKS = ("method_step", "mixed_batch", "meta_attach", "interactive_tree", "training_job", "engines",
              "saving", "fingerprint", "qlora", "packing")
"""Module names under ``benchmarks`` that define ``run(quick) -> Result``, in the order they run."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the suite (or some of it)")
    run.add_argument("--quick", action="store_true", help="small sizes and few rounds")
    run.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS))
    run.add_argument("--check", action="store_true", help="exit 1 when a ratio misses its target")
    commands.add_parser("list", help="the benchmarks")
    args = parser.parse_args(argv)
    if args.command == "list":
        print("\n".join(BENCHMARKS))
        return 0
    missed = []
    for index, name in enumerate(args.only, 1):
        print(f"[{index}/{len(args.only)}] {name} ...", flush=True)
        start = time.perf_counter()
        result = importlib.import_module(f"benchmarks.{name}").run(args.quick)
        show(result)
        path = write(result, args.quick)
        placed = [page.name for page in TABLE_PAGES if update_readme(result, path, page)]
        print(f"    {time.perf_counter() - start:.0f} s; wrote {path}"
              f"{' and the table in ' + ', '.join(placed) if placed else ''}")
        missed += [check for check in result.checks if not check.passed]
    if args.check and missed:
        print(f"{len(missed)} target(s) missed: " + "; ".join(c.what for c in missed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
