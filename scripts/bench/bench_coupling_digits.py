"""Coupled training (ICMIL) on digit bags: bag and instance AUC per round over several seeds.

    python scripts/bench/bench_coupling_digits.py [--seeds 0 1 2 3 4] [--rounds 2]

Builder: tests/coupling_digits.py (a random-init 4-d CNN embedder of raw 8x8 digits, ABMIL); the
figures are in docs/models.md ("Coupled training").
"""

import argparse
import logging
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from coupling_digits import run  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    logging.disable(logging.INFO)
    torch.set_num_threads(1)
    t0 = time.process_time()
    rows = pd.DataFrame([r for s in args.seeds for r in run(s, rounds=args.rounds)])
    print(rows.pivot(index="seed", columns="round", values=["bag_auc", "instance_auc"]).round(3).to_string())
    agg = rows.groupby("round")[["bag_auc", "instance_auc"]].agg(["mean", "std", "min"]).round(3)
    print(agg.to_string())
    print(f"CPU seconds: {time.process_time() - t0:.0f} ({len(args.seeds)} seeds, one thread)")


if __name__ == "__main__":
    main()
