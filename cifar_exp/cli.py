"""The `cifar-exp` command: parse, validate, call the library, print. Options come from TrainConfig."""

from __future__ import annotations

import logging
import signal
import sys
import typing
from pathlib import Path

import click

from .config import ConfigError, TrainConfig, load_config


def _fail(message: str, code: int = 2) -> typing.NoReturn:
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)


def _click_type(annotation) -> tuple[click.ParamType, bool]:
    """(click type, is_bool) for a config field's annotation."""
    if typing.get_origin(annotation) is typing.Literal:
        return click.Choice(typing.get_args(annotation)), False
    if annotation is bool:
        return click.BOOL, True
    return {int: click.INT, float: click.FLOAT}.get(annotation, click.STRING), False


def config_options(fn):
    """One option per TrainConfig field, default None so only what the user typed overrides."""
    for name, info in reversed(TrainConfig.model_fields.items()):
        ptype, is_bool = _click_type(info.annotation)
        shown = str(info.default).lower() if is_bool else info.default
        extra = {"is_flag": False, "flag_value": "true"} if is_bool else {}  # --amp, --amp false
        fn = click.option(
            f"--{name.replace('_', '-')}", name, type=ptype, default=None, metavar=None,
            help=f"{info.description} [default: {shown}]", **extra,
        )(fn)
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="cifar_exp")
def cli() -> None:
    """Train and compare CIFAR-100 models, tracked in MLflow."""


@cli.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
              help="YAML or JSON file of config fields; flags override it.")
@config_options
def train(config_file: Path | None, **overrides) -> None:
    """Train one model, test its best checkpoint, and log everything to MLflow."""
    try:
        cfg = load_config(config_file, **overrides)
    except ConfigError as e:
        _fail(str(e))  # before torch loads: a typo in a flag answers at once
    from . import train as T
    from .data import DataError

    try:
        prepared = T.prepare(cfg)  # bad data or weights fail here, before a run exists
    except (ConfigError, DataError) as e:
        _fail(str(e))
    from .tracking import mlflow_run

    # SIGTERM (preemption, `kill`) ends the run as KILLED, as Ctrl-C does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with mlflow_run(cfg) as tracker:
            click.echo(f"run {tracker.run_id} in experiment '{tracker.experiment_name}'")
            result = T.run(cfg, tracker, prepared)
    except KeyboardInterrupt:
        _fail("interrupted; the run was ended as KILLED", 130)
    except (ConfigError, DataError) as e:
        _fail(str(e))
    m = result.test_metrics
    click.echo(
        f"test_accuracy={m['test_accuracy']:.4f} test_top5_accuracy={m['test_top5_accuracy']:.4f} "
        f"test_macro_f1={m['test_macro_f1']:.4f} (best epoch {result.best_epoch + 1})"
    )
    if result.model_uri:
        click.echo(f"model: {result.model_uri}")
    if cfg.register_as:
        from .registry import register

        reg = register(result.model_uri, cfg.register_as, cfg.model, m, tracker.run_id)
        champ = "champion" in reg.aliases
        click.echo(f"registered {reg.uri} as {', '.join(reg.aliases)}"
                   + ("" if champ else f" (champion stays version {reg.previous_champion}: higher test_accuracy)"))


@cli.command()
@click.option("--model-uri", help="models:/<model_id>, models:/NAME@alias, runs:/..., or a path.")
@click.option("--run-id", help="A training run; its logged model is evaluated.")
@click.option("--data-dir", default="", help="Folder holding CIFAR-100 (as for train).")
@click.option("--download", type=click.BOOL, default=True, show_default=True, help="Download CIFAR-100 if missing.")
@click.option("--into-source-run", is_flag=True, help="Log into the run that trained the model, not a new run.")
@click.option("--experiment-name", help="Experiment of the new run [default: the source run's].")
@click.option("--batch-size", type=click.IntRange(1), default=256, show_default=True)
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True, help="t-SNE subsample and layout.")
def evaluate(model_uri, run_id, data_dir, download, into_source_run, experiment_name, batch_size, seed) -> None:
    """Re-evaluate a logged or registered model on the CIFAR-100 test set, from a fresh process."""
    if bool(model_uri) == bool(run_id):
        _fail("give exactly one of --model-uri and --run-id")
    from . import registry
    from .config import default_data_dir
    from .data import DataError, load_cifar100
    from .evaluate import evaluate_model
    from .tracking import log_reevaluation

    try:
        uri = model_uri or registry.model_uri_for_run(run_id)
        data = load_cifar100(Path(data_dir).expanduser() if data_dir else default_data_dir(), download)
        model = registry.load(uri)
        test = data.test
        ev = evaluate_model(model.module, test.images, test.labels.numpy(), data.classes, data.superclasses,
                            data.fine_to_coarse, batch_size, seed)
    except (DataError, registry.ModelError, ValueError) as e:
        _fail(str(e))
    if model.metadata.get("dataset_digest") not in (None, data.digest):
        click.echo(f"note: the model was trained on dataset {model.metadata['dataset_digest']}, "
                   f"this test set is from {data.digest}", err=True)
    new_run = log_reevaluation(ev, uri, model.source_run_id, into_source_run, experiment_name)
    m = ev.metrics
    click.echo(f"{uri} on {len(test)} test images: accuracy={m['test_accuracy']:.4f} "
               f"top5={m['test_top5_accuracy']:.4f} macro_f1={m['test_macro_f1']:.4f} macro_auc={m['test_macro_auc']:.4f} "
               f"superclass_accuracy={m['test_superclass_accuracy']:.4f} "
               f"within_superclass_error_share={m['test_within_superclass_error_share']:.3f} (chance 0.040)")
    click.echo(f"logged to run {new_run}")


@cli.command()
@click.option("--model-uri", required=True, help="models:/NAME@champion, models:/NAME/3, models:/<model_id>, ...")
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--top-k", type=click.IntRange(1, 100), default=5, show_default=True)
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
def predict(model_uri: str, images: tuple[str, ...], top_k: int, fmt: str) -> None:
    """Classify image files (PNG, JPEG; any size or mode) with a logged or registered model."""
    import json

    from . import registry
    from .data import DataError, load_images

    try:
        batch = load_images(list(images))
        results = registry.predict(registry.load(model_uri), batch, top_k)
    except (DataError, registry.ModelError, ValueError) as e:
        _fail(str(e))
    if fmt == "json":
        click.echo(json.dumps([{"image": p, "top_k": [{"class": c, "probability": round(q, 6)} for c, q in r]}
                               for p, r in zip(images, results)], indent=2))
        return
    for path, ranked in zip(images, results):
        click.echo(f"{path}: " + ", ".join(f"{c} {q:.1%}" for c, q in ranked))


@cli.command()
@click.argument("name")
@click.argument("version", type=click.IntRange(1))
@click.option("--alias", default="champion", show_default=True)
def promote(name: str, version: int, alias: str) -> None:
    """Point an alias (champion by default) at a version of a registered model."""
    from . import registry

    try:
        registry.promote(name, version, alias)
    except registry.ModelError as e:
        _fail(str(e))
    click.echo(f"models:/{name}@{alias} -> version {version}")


@cli.command()
@click.argument("name")
def models(name: str) -> None:
    """List the versions of a registered model with their aliases and metrics."""
    from . import registry

    try:
        rows = registry.list_versions(name)
    except registry.ModelError as e:
        _fail(str(e))
    fmt = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
    click.echo(f"{'version':>7}  {'aliases':22} {'family':9} {'test_acc':>8} {'macro_f1':>8}  run")
    for r in rows:
        click.echo(f"{r['version']:>7}  {','.join(r['aliases']):22} {r['family']:9} {fmt(r['test_accuracy']):>8} "
                   f"{fmt(r['test_macro_f1']):>8}  {r['run_id']}")


@cli.command()
@click.option("--experiment-name", default="cifar100", show_default=True)
@click.option("--metric", default="test_accuracy", show_default=True,
              type=click.Choice(["test_accuracy", "test_macro_f1", "test_macro_auc", "test_top5_accuracy",
                                 "training_seconds", "parameter_count"]))
@click.option("--family", type=click.Choice(["cnn", "resnet18"]), help="Only this model family.")
@click.option("--tag", help="Only runs with this tag: KEY or KEY=VALUE.")
@click.option("--since", help="Only runs started at or after this ISO date, e.g. 2026-12-01.")
@click.option("--filter", "filter_string", help="An MLflow filter string, e.g. \"params.lr = '0.05'\".")
@click.option("--format", "fmt", type=click.Choice(["text", "markdown", "csv", "json"]), default="text", show_default=True)
@click.option("--report", "report_dir", type=click.Path(file_okay=False, path_type=Path), help="Write report.md and plots here.")
@click.option("--log", "log_run", is_flag=True, help="Record the report in a `comparison` run.")
@click.option("--stats/--no-stats", default=True, show_default=True, help="Bootstrap CIs and McNemar (need predictions).")
def compare(experiment_name, metric, family, tag, since, filter_string, fmt, report_dir, log_run, stats) -> None:
    """Rank scratch-CNN runs against ResNet-18 runs, with confidence intervals and a paired test."""
    import tempfile

    from mlflow.exceptions import MlflowException

    from . import compare as C

    try:
        result = C.compare(experiment_name, metric, family, tag, since, filter_string, with_stats=stats)
    except (C.CompareError, ValueError) as e:
        _fail(str(e))
    except MlflowException as e:
        _fail(f"MLflow refused the query: {str(e.message).splitlines()[0]}")
    click.echo(C.render(result, fmt), nl=False)
    if report_dir or log_run:
        out = report_dir or Path(tempfile.mkdtemp(prefix="cifar_exp-compare-"))
        files = C.write_report(result, out)
        click.echo(f"report: {out / 'report.md'}", err=True)
        if log_run:
            click.echo(f"logged comparison run {C.log_comparison(result, files)}", err=True)


def main() -> None:
    """Entry point: click's usage errors become one `Error:` line (no usage dump), exit code 2."""
    # MLflow's INFO chatter (creating tables, experiments) would bury our one-line messages.
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    try:
        code = cli.main(prog_name="cifar-exp", standalone_mode=False)
    except click.ClickException as e:
        _fail(e.format_message(), e.exit_code)
    except click.exceptions.Abort:
        _fail("aborted", 130)
    sys.exit(code if isinstance(code, int) else 0)
