"""Training time of each MIL model on the digit-bags benchmark (the tests' digit bags, one thread).

The tests assert what the models learn (bag and instance AUC) and bound the work in epochs; how
long that takes depends on the machine and on what else runs on it, so it is measured here and
written down in docs/benchmarks.md instead of being asserted.

    .venv/bin/python scripts/bench/bench_digit_bags.py                 # every model of the tests
    .venv/bin/python scripts/bench/bench_digit_bags.py --models abmil clam

Prints a Markdown table: wall and CPU seconds, epochs run, bag AUC.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
from sklearn.metrics import roc_auc_score

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))  # the one digit-bag generator (tests/digit_bags.py)

from digit_bags import CLASSES, case_digit_bags, digit_bags, multiscale_digit_bags  # noqa: E402
from slidesnake.training import train_fold  # noqa: E402

# model: (generator, model_kwargs, training kwargs) -- the settings of the tests' benchmarks
RUNS = {
    "abmil": (digit_bags, {"hidden": 64, "gated": True}, {"lr": 1e-3, "epochs": 20, "patience": 5, "min_epochs": 5}),
    "clam": (digit_bags, {"hidden": 64, "attn_dim": 32, "k_sample": 2},
             {"lr": 1e-3, "epochs": 20, "patience": 5, "min_epochs": 5}),
    "da_mil": (digit_bags, {"hidden": 64, "sub_bag_size": 8}, {"lr": 1e-3, "epochs": 15, "patience": 3, "min_epochs": 5}),
    "transmil": (digit_bags, {"hidden": 64}, {"lr": 2e-4, "epochs": 6, "patience": 2, "min_epochs": 5}),
    "cma_mil": (multiscale_digit_bags, {"hidden": 32, "heads": 2, "dropout": 0.1},
                {"lr": 1e-3, "epochs": 15, "patience": 4, "min_epochs": 4}),
    "hier_multistain": (case_digit_bags, {"hidden": 32, "attn_dim": 16, "dropout": 0.1},
                        {"lr": 1e-3, "epochs": 15, "patience": 4, "min_epochs": 4}),
}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="*", default=list(RUNS), choices=list(RUNS))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(f"{platform.node()}, {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread\n")
    print("| model | wall s | CPU s | epochs run | bag AUC |\n|---|---|---|---|---|")
    for name in args.models:
        make, model_kwargs, training = RUNS[name]
        bags, _, splits = make()
        t0, c0 = time.perf_counter(), time.process_time()
        res = train_fold(bags, splits, CLASSES, name, model_kwargs, seed=0, device="cpu", **training)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        test = res.predictions[res.predictions["split"] == "test"]
        auc = roc_auc_score(test["label"] == "nine", test["prob_nine"])
        print(f"| {name} | {wall:.1f} | {cpu:.1f} | {len(res.history)} | {auc:.3f} |", flush=True)


if __name__ == "__main__":
    main()
