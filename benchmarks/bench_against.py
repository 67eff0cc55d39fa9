"""One workload on this checkout and on another commit, back to back.

Speed targets are ratios to an earlier main measured in one sitting on the
same machine: this script runs ``raysage simulate FLAGS`` alternately from
this checkout and from ``--old`` (a checkout of the earlier commit, e.g.
``git worktree add /tmp/old 15ef147``), in the order old, new, new, old for
two pairs, and prints each run's host time per round, the ratio new/old of
round 0 and of the later rounds, and whether accuracy agrees.

    .venv/bin/python benchmarks/bench_against.py --old /tmp/old            # quick start, 3 rounds
    .venv/bin/python benchmarks/bench_against.py --old /tmp/old --pairs 1 -- \\
        --algorithm fsl_sage --clients 10000 --participation 0.1 --rounds 1
"""

from __future__ import annotations

import argparse

from bench_memory import MIB, measure

QUICK_START = ["--clients", "200", "--rounds", "3"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="checkout of the commit to compare with")
    parser.add_argument("--new", default=None,
                        help="checkout to measure as new (default: this one)")
    parser.add_argument("--pairs", type=int, default=2, help="old/new pairs (default 2)")
    parser.add_argument("--new-flags", default="",
                        help="flags only the new checkout gets (e.g. a setting it added)")
    parser.add_argument("flags", nargs="*", help="simulate flags after --, instead of the "
                                                 "quick start's 3 rounds")
    args = parser.parse_args()
    flags = args.flags or QUICK_START
    print("$ raysage simulate " + " ".join(flags), flush=True)
    order = ["old", "new", "new", "old"] * ((args.pairs + 1) // 2)
    runs: dict[str, list[dict]] = {"old": [], "new": []}
    for which in order[:2 * args.pairs]:
        tree = args.old if which == "old" else args.new
        extra = args.new_flags.split() if which == "new" else []
        m = measure(flags + extra, tree=tree)
        runs[which].append(m)
        print(f"  {which}: rounds " + ", ".join(f"{w:.2f}" for w in m["walls"]) +
              f" s; peak {m['peak_pss'] / MIB:.0f} MiB; accuracy {m['accuracy']:.4f}",
              flush=True)

    def mean(which: str, part) -> float:
        values = [part(m["walls"]) for m in runs[which]]
        return sum(values) / len(values)

    first = mean("new", lambda w: w[0]) / mean("old", lambda w: w[0])
    print(f"round 0: new/old {first:.2f}x")
    if len(runs["old"][0]["walls"]) > 1:
        later = (mean("new", lambda w: sum(w[1:]) / len(w[1:]))
                 / mean("old", lambda w: sum(w[1:]) / len(w[1:])))
        print(f"rounds 1+: new/old {later:.2f}x")
    peak = (sum(m["peak_pss"] for m in runs["new"]) / len(runs["new"])
            / (sum(m["peak_pss"] for m in runs["old"]) / len(runs["old"])))
    print(f"peak memory: new/old {peak:.2f}x")
    same = {m["accuracy"] for m in runs["old"]} == {m["accuracy"] for m in runs["new"]}
    print("final accuracy " + ("identical" if same else "differs: " + ", ".join(
        f"{w} {m['accuracy']:.4f}" for w in runs for m in runs[w])))


if __name__ == "__main__":
    main()
