"""`compare` on an experiment with 1,000 runs in the embedded sqlite store. Target: <= 5 s.

Creates the runs once (params, tags, test metrics and a 3-epoch val curve each, as training logs them;
per-image predictions for two of them), then times a full comparison with statistics.
Usage: python benchmarks/compare_scale.py [--runs 1000] [--db /tmp/compare_scale.db]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--db", default=str(Path(tempfile.gettempdir()) / "cifar_exp_compare_scale.db"))
    args = ap.parse_args()
    fresh = not Path(args.db).exists()
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{args.db}"
    from mlflow import MlflowClient
    from test_compare import correct_array, make_run

    from cifar_exp import compare as C
    from cifar_exp.config import TrainConfig

    client = MlflowClient()
    if fresh:
        t = time.perf_counter()
        eid = client.create_experiment("scale")
        full = {k: v for k, v in TrainConfig().to_params().items() if k not in {"model", "seed", "run_name"}}
        rng = np.random.default_rng(0)
        for i in range(args.runs):
            family = "cnn" if i % 2 else "resnet18"
            acc = float(rng.uniform(0.5, 0.75) if family == "cnn" else rng.uniform(0.7, 0.82))
            best = i in (args.runs - 1, args.runs - 2)
            make_run(client, eid, family, i % 5, 0.9 if best and family == "resnet18" else (0.76 if best else acc),
                     1000 + i, correct_array(9000 if best and family == "resnet18" else 7600, 10_000) if best else None,
                     extra={**full, "lr": str([0.05, 0.1][i % 2])})
        print(f"created {args.runs} runs in {time.perf_counter() - t:.1f} s ({args.db})")
    t = time.perf_counter()
    result = C.compare("scale")
    text = C.render(result, "text")
    elapsed = time.perf_counter() - t
    print(text.splitlines()[-1])
    print(f"compare over {len(result.runs)} runs, with statistics: {elapsed:.2f} s (target <= 5 s)")


if __name__ == "__main__":
    main()
