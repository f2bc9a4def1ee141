"""Summarise a `make mutate` run: the mutation score per module and the surviving mutants.

Reads ``mutmut results --all true`` (run from the repository root after ``mutmut run``) and keeps
the mutants of the functions that ``make mutate`` targets (``PATTERNS``, the same globs the
Makefile passes to ``mutmut run``). A mutant is *killed* when a test failed or timed out on it,
*survived* when every test passed, *no tests* when no selected test reaches its function
(*suspicious*: the run ended oddly; counted as not killed). The
score of a module is ``killed / (killed + survived + no tests)``.

Usage: ``python tools/mutation_score.py [--min 90]`` (exit 1 when a module scores below ``--min``).
"""

from __future__ import annotations

import argparse
import fnmatch
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

#: The mutants `make mutate` runs (mutmut names: ``module.x_function__mutmut_N`` and
#: ``module.xǁClassǁmethod__mutmut_N``). Keep in step with MUTATE_TARGETS in the Makefile.
PATTERNS = (
    "alignment.ddpo.*",
    "alignment.dpo.*",
    "alignment.draft.*",
    "alignment.flow.*",
    "reward.losses.*",
    "reward.modeling.x_masked_skip_cross_attention__mutmut_*",
    "reward.modeling.x*RewardHead*forward__mutmut_*",
)
KILLED = {"killed", "timeout", "segfault", "caught by type check"}
COUNTED = KILLED | {"survived", "no tests", "suspicious"}


def read_results(mutmut: str) -> dict[str, str]:
    out = subprocess.run(
        [mutmut, "results", "--all", "true"], capture_output=True, text=True, check=True
    ).stdout
    results = {}
    for line in out.splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep and any(fnmatch.fnmatch(name, p) for p in PATTERNS):
            results[name] = status
    return results


def module_of(name: str) -> str:
    module, _, func = name.rpartition(".")
    if module == "reward.modeling":
        return "reward.modeling (SkipCA)"
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min", type=float, default=None, help="fail below this score (%)")
    parser.add_argument("--mutmut", default=str(Path(sys.executable).with_name("mutmut")))
    args = parser.parse_args(argv)
    results = read_results(args.mutmut)
    if not results:
        print("No mutant results: run `make mutate` (mutmut run) first.")
        return 1
    by_module: dict[str, Counter] = defaultdict(Counter)
    survivors: dict[str, list[str]] = defaultdict(list)
    for name, status in sorted(results.items()):
        by_module[module_of(name)][status] += 1
        if status in COUNTED - KILLED:
            survivors[module_of(name)].append(f"{name} ({status})")
    print("| module | mutants | killed | survived | no tests | not run | score |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    low = []
    total = Counter()
    for module, c in sorted(by_module.items()):
        killed = sum(c[s] for s in KILLED)
        counted = sum(c[s] for s in COUNTED)
        score = 100.0 * killed / counted if counted else float("nan")
        total.update(c)
        print(
            f"| {module} | {sum(c.values())} | {killed} | {c['survived']} | {c['no tests']} | "
            f"{sum(c.values()) - counted} | {score:.1f} % |"
        )
        if args.min is not None and not score >= args.min:
            low.append(module)
    killed = sum(total[s] for s in KILLED)
    counted = sum(total[s] for s in COUNTED)
    print(
        f"| all | {sum(total.values())} | {killed} | {total['survived']} | {total['no tests']} | "
        f"{sum(total.values()) - counted} | {100.0 * killed / max(counted, 1):.1f} % |"
    )
    for module, names in sorted(survivors.items()):
        print(f"\n{module}: {len(names)} not killed")
        for n in names:
            print(f"  {n}")
    if low:
        print(f"\nBelow {args.min} %: {', '.join(low)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
