"""The differential fuzzer, long form: random models from the op zoo (tests/fuzz_zoo.py) under random plans on 4
gloo ranks, each compared with one process (losses over 2 SGD steps and first-step gradients, 1e-5 relative).

    python tests/benchmarks/fuzz_parity.py --seeds 50 --pairs 10        # 500 (model, plan) pairs

Prints every mismatch or error as it is found and a summary: pairs, patterns and plan kinds covered, wall time,
mismatches. A mismatch is a bug to fix at its root and to keep as a named regression test
(tests/test_silent_wrong.py); `--json FILE` saves every result for that.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.benchmarks._machine import describe  # noqa: E402
from tests.fuzz_zoo import PATTERNS, PLAN_KINDS, random_cases  # noqa: E402
from tests.parity_worker import launch  # noqa: E402

RTOL = 1e-5


def mismatch(result: dict) -> str | None:
    if "error" in result:
        return result["error"].splitlines()[0]
    if result["loss_rel"] > RTOL or result["grad_bad"]:
        return f"loss rel {result['loss_rel']:.1e}, gradients differ: {result['grad_bad']}"
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=5, help="number of seeds (0..N-1)")
    ap.add_argument("--first-seed", type=int, default=100, help="seeds start here (the CI subset uses its own)")
    ap.add_argument("--pairs", type=int, default=10, help="(model, plan) pairs per seed")
    ap.add_argument("--per-launch", type=int, default=60, help="pairs per torchrun launch")
    ap.add_argument("--json", default=None, help="write every result here")
    args = ap.parse_args(argv)
    print(describe(), flush=True)
    cases = [c for s in range(args.first_seed, args.first_seed + args.seeds) for c in random_cases(args.pairs, s)]
    t0, results = time.perf_counter(), {}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(0, len(cases), args.per_launch):
            chunk = cases[i: i + args.per_launch]
            got = launch(chunk, 4, Path(tmp), timeout=3600)
            for case in chunk:
                results[case["id"]] = {**got[case["id"]], "patterns": case["patterns"], "fix": case["fix"]}
                bad = mismatch(got[case["id"]])
                if bad:
                    print(f"MISMATCH {case['id']} {case['patterns']} {case['fix']}: {bad}", flush=True)
            print(f"{min(i + args.per_launch, len(cases))}/{len(cases)} pairs, {time.perf_counter() - t0:.0f} s",
                  flush=True)
    seconds = time.perf_counter() - t0
    kinds = Counter(c["id"].split("-", 2)[2] for c in cases)
    patterns = Counter(p for c in cases for p in c["patterns"])
    bad = [k for k, r in results.items() if mismatch(r)]
    print(f"pairs {len(cases)}; patterns {len(patterns)}/{len(PATTERNS)} (least used: "
          f"{min(patterns.values())} pairs); plan kinds {len(kinds)}/{len(PLAN_KINDS)} {dict(kinds)}; "
          f"{seconds:.0f} s wall ({seconds / len(cases):.1f} s per pair, 4 ranks); mismatches {len(bad)} {bad}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
