"""``python -m tests.faults [--runs N] [--tp-runs N] [--out benchmarks/results/faults.json]``: the fault campaign
(tests/faults/campaign.py) over every fault class, written as rows ``{fault, injected, contained, leaked_slots,
wrong_kv, hangs}`` (plus runs and seconds) with the machine and the commit."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from tests.faults import campaign

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faults", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100, help="runs per single-process class (default 100)")
    parser.add_argument("--tp-runs", type=int, default=200,
                        help="runs per TP class (default 200: the fault is on each rank in half of them)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", default=None, help="run only these classes")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "faults.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from kvtc_sglang.eval.provenance import git_commit, machine_description

    t0 = time.perf_counter()
    rows = []
    names = args.only or campaign.all_single_process_classes()
    for name in names:
        if name.startswith("tp."):
            continue
        rows.append(campaign.run_class(name, args.runs, args.seed, progress=lambda line: print(line, flush=True)))
    if args.only is None or any(n.startswith("tp.") for n in args.only):
        for row in campaign.run_tp(args.tp_runs, args.seed):
            print(f"{row.fault}: {row.as_json()}", flush=True)
            rows.append(row)
    bad = [r.fault for r in rows if not (r.injected >= 100 and r.contained == r.injected and r.leaked_slots == 0
                                         and r.wrong_kv == 0 and r.hangs == 0)]
    result = {
        "command": " ".join(["python -m tests.faults", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_description(),
        "commit": git_commit(ROOT),
        "torch": torch.__version__,
        "seconds": round(time.perf_counter() - t0, 1),
        "classes": len(rows),
        "all_contained": not bad,
        "not_meeting_the_bar": bad,
        "rows": [r.as_json() for r in rows],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}: {len(rows)} classes in {result['seconds']} s; "
          f"{'every class contained' if not bad else 'not meeting the bar: ' + ', '.join(bad)}")
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
