"""Rank scratch-CNN runs against ResNet-18 runs from what MLflow holds; never retrains.

Groups are runs that share a family and every config field but the seed; the statistics compare
the best run of each family on the same test images (paired).
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient
from scipy.stats import binomtest

FAMILIES = {"cnn": "scratch CNN", "resnet18": "ResNet-18"}
# Lower is better for these; everything else ranks high-to-low.
ASCENDING = {"training_seconds", "parameter_count"}
METRICS = ("test_accuracy", "test_macro_f1", "test_macro_auc", "test_top5_accuracy", "training_seconds", "parameter_count")
# Params that do not change what was trained, so runs differing only in them are seeds of one setting.
NOT_CONFIG = {"seed", "run_name", "experiment_name", "data_dir", "download", "device", "log_model", "register_as"}
PREDICTIONS = "evaluation/predictions.npz"


class CompareError(ValueError):
    """Nothing honest can be said; the message says why."""


@dataclass
class Comparison:
    metric: str
    runs: pd.DataFrame  # one row per run, ranked
    groups: pd.DataFrame  # one row per (family, config) group: mean, std, n
    best: dict[str, pd.Series]  # family -> best run row
    stats: dict = field(default_factory=dict)  # bootstrap CIs, McNemar, the sentence
    experiment_id: str = ""


def fetch_runs(experiment_name: str, family: str | None = None, tag: str | None = None, since: str | None = None,
               filter_string: str | None = None, page_size: int = 1000, sweep: str | None = None) -> pd.DataFrame:
    """FINISHED training runs of an experiment as a frame, paged through search_runs."""
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment_name)
    if exp is None:
        names = [e.name for e in client.search_experiments()]
        raise CompareError(f"experiment {experiment_name!r} not found; experiments here: {', '.join(names) or 'none'}")
    clauses = ["attributes.status = 'FINISHED'", "tags.model_family != ''"]
    if family:
        clauses.append(f"params.model = '{family}'")
    if tag:
        key, _, value = tag.partition("=")
        clauses.append(f"tags.`{key}` = '{value}'" if value else f"tags.`{key}` != ''")
    if sweep:  # a sweep's children carry its id, as MLflow's nested runs do
        clauses.append(f"tags.mlflow.parentRunId = '{sweep}'")
    if since:
        start = datetime.fromisoformat(since).replace(tzinfo=datetime.fromisoformat(since).tzinfo or timezone.utc)
        clauses.append(f"attributes.start_time >= {int(start.timestamp() * 1000)}")
    if filter_string:
        clauses.append(f"({filter_string})" if " or " in filter_string.lower() else filter_string)
    rows, token = [], None
    while True:
        page = client.search_runs([exp.experiment_id], " and ".join(clauses), ViewType.ACTIVE_ONLY,
                                  max_results=page_size, page_token=token)
        for r in page:
            p = r.data.params
            rows.append({
                "run_id": r.info.run_id, "run_name": r.info.run_name, "family": p.get("model", r.data.tags["model_family"]),
                "seed": p.get("seed", ""), "start_time": r.info.start_time,
                "config": tuple(sorted((k, v) for k, v in p.items() if k not in NOT_CONFIG)),
                "dataset_digest": r.data.tags.get("dataset_digest", ""),
                **{m: r.data.metrics.get(m, math.nan) for m in METRICS},
            })
        token = page.token
        if not token:
            break
    df = pd.DataFrame(rows, columns=["run_id", "run_name", "family", "seed", "start_time", "config", "dataset_digest", *METRICS])
    df.attrs["experiment_id"] = exp.experiment_id
    return df


def rank(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Best first; ties go to the earlier run, then the smaller run id, so the order never flickers."""
    if metric not in METRICS:
        raise CompareError(f"metric {metric!r} is not one of {', '.join(METRICS)}")
    missing = df[df[metric].isna()]
    if len(missing):
        raise CompareError(f"{len(missing)} run(s) lack {metric}: {', '.join(missing['run_id'])}")
    return df.sort_values([metric, "start_time", "run_id"], ascending=[metric in ASCENDING, True, True],
                          kind="mergesort").reset_index(drop=True)


def group(ranked: pd.DataFrame, metric: str) -> pd.DataFrame:
    g = ranked.groupby(["family", "config"], sort=False)[metric]
    out = pd.DataFrame({"mean": g.mean(), "std": g.std(ddof=1).fillna(0.0), "n": g.size(), "best_run": g.apply(lambda s: ranked.loc[s.index[0], "run_id"])})
    out = out.reset_index().sort_values("mean", ascending=metric in ASCENDING, kind="mergesort")
    out["setting"] = [_describe(c, ranked) for c in out["config"]]
    return out.drop(columns="config").reset_index(drop=True)


def _describe(config: tuple, runs: pd.DataFrame) -> str:
    """The config fields that differ across the compared groups, e.g. 'lr=0.05 input_size=224'."""
    all_configs = [dict(c) for c in runs["config"].unique()]
    mine = dict(config)
    varying = sorted(k for k in mine if len({c.get(k) for c in all_configs}) > 1 and k != "model")
    return " ".join(f"{k}={mine[k]}" for k in varying) or "-"


def load_correct(run_id: str) -> np.ndarray:
    """Per-test-image correctness from a run's logged predictions."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = MlflowClient().download_artifacts(run_id, PREDICTIONS, tmp)
        except Exception:
            raise CompareError(f"run {run_id} has no logged {PREDICTIONS}; the statistics need per-image predictions") from None
        with np.load(path) as z:
            return z["pred"] == z["true"]


def bootstrap_ci(correct: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(correct), (n_boot, len(correct)))
    accs = correct[idx].mean(1)
    return float(np.quantile(accs, (1 - level) / 2)), float(np.quantile(accs, (1 + level) / 2))


def paired_bootstrap_diff_ci(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """CI of accuracy(b) - accuracy(a), resampling test images jointly (the comparison is paired)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), (n_boot, len(a)))
    diffs = b[idx].mean(1) - a[idx].mean(1)
    return float(np.quantile(diffs, 0.025)), float(np.quantile(diffs, 0.975))


def mcnemar(a_correct: np.ndarray, b_correct: np.ndarray) -> dict[str, float]:
    """Exact McNemar test on the discordant pairs; also the chi-square statistic with continuity correction."""
    b = int((a_correct & ~b_correct).sum())  # only A right
    c = int((~a_correct & b_correct).sum())  # only B right
    chi2 = (abs(b - c) - 1) ** 2 / (b + c) if b + c else 0.0
    p = binomtest(min(b, c), b + c, 0.5).pvalue if b + c else 1.0
    return {"only_a_correct": b, "only_b_correct": c, "chi2": float(chi2), "p_value": float(p)}


def statistics(best: dict[str, pd.Series], digests: dict[str, str]) -> dict:
    """Bootstrap CIs per family's best run, and the paired CNN-vs-ResNet-18 test with its sentence."""
    correct = {fam: load_correct(row["run_id"]) for fam, row in best.items()}
    out: dict = {"ci": {fam: bootstrap_ci(c) for fam, c in correct.items()}}
    if {"cnn", "resnet18"} <= set(best):
        if digests["cnn"] != digests["resnet18"]:
            raise CompareError(f"the best runs were tested on different data (dataset digests {digests['cnn']} "
                               f"and {digests['resnet18']}); a paired test needs the same test images")
        a, b = correct["cnn"], correct["resnet18"]
        if len(a) != len(b):
            raise CompareError(f"the best runs logged predictions for {len(a)} and {len(b)} test images")
        test = mcnemar(a, b)
        diff = float(b.mean() - a.mean())
        lo, hi = paired_bootstrap_diff_ci(a, b)
        verb = "beats" if diff > 0 else "trails"
        out["paired"] = {**test, "difference": diff, "difference_ci": (lo, hi)}
        out["sentence"] = (f"ResNet-18 {verb} the scratch CNN by {abs(diff) * 100:.1f} points "
                           f"(95% CI {lo * 100:.1f}–{hi * 100:.1f}, McNemar p={_p(test['p_value'])}).")
    return out


def _p(p: float) -> str:
    return f"{p:.2g}" if p >= 1e-4 else "<0.0001"


def compare(experiment_name: str, metric: str = "test_accuracy", family: str | None = None, tag: str | None = None,
            since: str | None = None, filter_string: str | None = None, with_stats: bool = True,
            sweep: str | None = None) -> Comparison:
    runs = fetch_runs(experiment_name, family, tag, since, filter_string, sweep=sweep)
    if runs.empty:
        raise CompareError(f"no FINISHED training runs in experiment {experiment_name!r} match the filters")
    ranked = rank(runs, metric)
    best = {fam: ranked[ranked["family"] == fam].iloc[0] for fam in FAMILIES if (ranked["family"] == fam).any()}
    result = Comparison(metric, ranked, group(ranked, metric), best, experiment_id=runs.attrs["experiment_id"])
    if with_stats:
        result.stats = statistics(best, {f: r["dataset_digest"] for f, r in best.items()})
    if len(best) < 2:
        present = next(iter(best))
        other = next(f for f in FAMILIES if f != present)
        result.stats["note"] = f"only {FAMILIES[present]} runs are present; train --model {other} to compare families"
    return result


# --- output ---------------------------------------------------------------------------------

def table(result: Comparison) -> pd.DataFrame:
    """The ranked runs as a flat table."""
    cols = ["run_id", "run_name", "family", "seed", *METRICS]
    t = result.runs[cols].copy()
    t.insert(0, "rank", np.arange(1, len(t) + 1))
    return t


def render(result: Comparison, fmt: str = "text") -> str:
    t = table(result)
    if fmt == "csv":
        return t.to_csv(index=False)
    if fmt == "json":
        import json

        stats = {k: v for k, v in result.stats.items()}
        stats["ci"] = {f: list(ci) for f, ci in stats.get("ci", {}).items()}
        return json.dumps({"metric": result.metric, "runs": t.to_dict("records"),
                           "groups": result.groups.to_dict("records"), "statistics": stats}, indent=2, default=float)
    floatfmt = {m: "{:.4f}".format for m in ("test_accuracy", "test_macro_f1", "test_macro_auc", "test_top5_accuracy")}
    floatfmt |= {"training_seconds": "{:.0f}".format, "parameter_count": lambda v: f"{v / 1e6:.2f}M"}
    shown = t.copy()
    for col, f in floatfmt.items():
        shown[col] = [("" if pd.isna(v) else f(v)) for v in shown[col]]
    groups = result.groups.assign(mean=result.groups["mean"].map("{:.4f}".format), std=result.groups["std"].map("{:.4f}".format))
    if fmt == "markdown":
        body = [f"### Runs ranked by {result.metric}", "", _md(shown), "", "### Groups (mean ± std over seeds)", "",
                _md(groups), ""]
    else:
        body = [f"Runs ranked by {result.metric}:", shown.to_string(index=False), "",
                "Groups (same family and config, over seeds):", groups.to_string(index=False)]
    for fam, (lo, hi) in result.stats.get("ci", {}).items():
        r = result.best[fam]
        body.append(f"best {FAMILIES[fam]}: {r['run_id']} test_accuracy {r['test_accuracy']:.4f} (95% bootstrap CI {lo:.4f}–{hi:.4f})")
    for key in ("sentence", "note"):
        if key in result.stats:
            body.append(result.stats[key])
    return "\n".join(body) + "\n"


def _md(df: pd.DataFrame) -> str:
    """A Markdown table (pandas' to_markdown would add tabulate as a dependency)."""
    cells = [[str(v) for v in row] for row in df.itertuples(index=False)]
    head = "| " + " | ".join(map(str, df.columns)) + " |"
    sep = "|" + "---|" * len(df.columns)
    return "\n".join([head, sep, *("| " + " | ".join(r) + " |" for r in cells)])


def write_report(result: Comparison, out_dir: Path) -> list[Path]:
    """report.md with its figures beside it; returns every file written."""
    from . import plots

    out_dir.mkdir(parents=True, exist_ok=True)
    client = MlflowClient()
    curves = {f"{FAMILIES[f]} ({r['run_id'][:8]})": [(m.step, m.value) for m in client.get_metric_history(r["run_id"], "val_accuracy")]
              for f, r in result.best.items()}
    figs = {
        "accuracy_by_family.png": plots.family_accuracy_figure(result.runs, result.stats.get("ci", {}), FAMILIES),
        "val_accuracy_curves.png": plots.curves_figure(curves, "val_accuracy"),
        "accuracy_vs_cost.png": plots.cost_figure(result.runs, FAMILIES),
    }
    written = []
    for name, fig in figs.items():
        fig.savefig(out_dir / name)
        plots.close(fig)
        written.append(out_dir / name)
    md = ["# CIFAR-100: scratch CNN vs ResNet-18", "", render(result, "markdown"), ""]
    md += [f"![{n}]({n})" for n in figs]
    (out_dir / "report.md").write_text("\n".join(md) + "\n")
    (out_dir / "runs.csv").write_text(render(result, "csv"))
    return [out_dir / "report.md", out_dir / "runs.csv", *written]


def log_comparison(result: Comparison, files: list[Path]) -> str:
    """A `comparison` run in the same experiment, holding the report and tagged with the compared runs."""
    from .runs import tracked_run

    ids = ",".join(result.runs["run_id"])
    tags = {"run_kind": "comparison", "metric": result.metric, "compared_run_count": str(len(result.runs)),
            # a tag holds 5,000 characters; the full list is always in comparison/runs.csv
            "compared_runs": ids if len(ids) <= 5000 else "see comparison/runs.csv",
            "best_runs": ",".join(f"{f}:{r['run_id']}" for f, r in result.best.items())}
    name = mlflow.get_experiment(result.experiment_id).name
    with tracked_run(name, "comparison", tags) as run:
        for f in files:
            mlflow.log_artifact(str(f), "comparison")
        if "paired" in result.stats:
            p = result.stats["paired"]
            mlflow.log_metrics({"accuracy_difference": p["difference"], "mcnemar_p_value": p["p_value"]})
        return run.info.run_id
