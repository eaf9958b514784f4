"""The `cifar-exp` command: parse, validate, call the library, print. Options come from TrainConfig."""

from __future__ import annotations

import logging
import os
import sys
import typing
from pathlib import Path

import click

from .config import ConfigError, TrainConfig


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


def _require_tracking() -> None:
    """One clear line, at once, when the tracking server is down (MLflow would retry for minutes)."""
    from .runs import TrackingError, check_tracking_server

    try:
        check_tracking_server()
    except TrackingError as e:
        _fail(str(e))


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
@click.option("--resume", "resume_id", metavar="RUN_ID",
              help="Continue this KILLED or FAILED run from its last checkpoint; only --epochs and --data-dir may change.")
@click.option("--nproc-per-node", type=click.IntRange(1), default=1, show_default=True,
              help="Train on N processes (GPUs) of this machine through torchrun; --batch-size is per process.")
@config_options
def train(config_file: Path | None, resume_id: str | None, nproc_per_node: int, **overrides) -> None:
    """Train one model, test its best checkpoint, and log everything to MLflow."""
    from .config import RESUMABLE_CHANGES, given_values, make_config

    if resume_id:  # MLproject's resume entry point passes 0 and "" for "as the run had it"
        overrides = {k: None if k in RESUMABLE_CHANGES and v in (0, "") else v for k, v in overrides.items()}
    try:
        given = given_values(config_file, **overrides)
        cfg = make_config(given)  # before torch and mlflow load: a typo in a flag answers at once
    except ConfigError as e:
        _fail(str(e))
    if nproc_per_node > 1 and "WORLD_SIZE" not in os.environ:
        from .launch import relaunch_under_torchrun

        relaunch_under_torchrun(nproc_per_node, sys.argv[1:])
    from . import launch
    from .data import DataError
    from .runs import TrackingError

    try:
        plan = launch.plan(cfg, given, resume_id)
    except (ConfigError, DataError, TrackingError) as e:
        _fail(str(e))
    with launch.StopOnSignal(lambda m: click.echo(m, err=True)) as stop:
        try:
            result = launch.execute(plan, stop, click.echo)
        except KeyboardInterrupt as e:
            if not plan.dist.main:
                sys.exit(stop.exit_code)
            _fail(f"{e or 'interrupted'}; run {plan.run_id} ended KILLED. "
                  f"Resume it with: cifar-exp train --resume {plan.run_id}", stop.exit_code)
        except (ConfigError, DataError, TrackingError) as e:
            _fail(str(e))
        except Exception:
            click.echo(f"run {plan.run_id} ended FAILED (traceback below and in its error.txt); "
                       f"after fixing the cause: cifar-exp train --resume {plan.run_id}", err=True)
            raise
    if result is not None:  # rank 0
        _report(plan.cfg, result, plan.run_id)


def _report(cfg: TrainConfig, result, run_id: str) -> None:
    m = result.test_metrics
    click.echo(
        f"test_accuracy={m['test_accuracy']:.4f} test_top5_accuracy={m['test_top5_accuracy']:.4f} "
        f"test_macro_f1={m['test_macro_f1']:.4f} (best epoch {result.best_epoch + 1})"
    )
    if result.model_uri:
        click.echo(f"model: {result.model_uri}")
    if cfg.register_as:
        from .registry import register

        reg = register(result.model_uri, cfg.register_as, cfg.model, m, run_id)
        champ = "champion" in reg.aliases
        click.echo(f"registered {reg.uri} as {', '.join(reg.aliases)}"
                   + ("" if champ else f" (champion stays version {reg.previous_champion}: higher test_accuracy)"))


def _csv(kind):
    def convert(ctx, param, value: str):
        try:
            return [kind(v.strip()) for v in value.split(",") if v.strip()]
        except ValueError:
            raise click.BadParameter(f"{value!r} is not a comma-separated list of {kind.__name__} values") from None
    return convert


@cli.command()
@click.option("--models", default="cnn,resnet18", show_default=True, callback=_csv(str), help="Comma-separated models.")
@click.option("--seeds", default="0,1,2", show_default=True, callback=_csv(int), help="Comma-separated seeds.")
@click.option("--param", "params", multiple=True, metavar="NAME=V1,V2", help="Another grid axis (repeatable).")
@click.option("--name", "sweep_name", default="", help="Name of the parent run [default: sweep-<timestamp>].")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
              help="YAML or JSON file of config fields shared by every run; flags override it.")
@config_options
def sweep(models, seeds, params, sweep_name, config_file, **overrides) -> None:
    """Train a grid (models x seeds x --param axes) as child runs under one parent run."""
    import time

    from . import sweep as S
    from .config import given_values

    try:
        axes = dict(S.parse_axis(p) for p in params if p.strip())  # MLproject passes "" for no axis
        base = given_values(config_file, **overrides)
        configs = S.expand(base, models, seeds, axes)
    except ConfigError as e:
        _fail(str(e))
    _require_tracking()
    grid = {"models": ",".join(models), "seeds": ",".join(map(str, seeds)), **{k: ",".join(v) for k, v in axes.items()}}
    experiment = configs[0].experiment_name
    from .launch import StopOnSignal

    with StopOnSignal(lambda m: click.echo(m, err=True)) as stop:
        try:
            parent, experiment, rows = S.run_sweep(configs, experiment, sweep_name or f"sweep-{time.strftime('%Y%m%d-%H%M%S')}",
                                                   grid, stop, click.echo)
        except KeyboardInterrupt as e:
            _fail(f"{e or 'interrupted'}; the sweep stopped (its current run ended KILLED and can be resumed)",
                  stop.exit_code)
        except RuntimeError as e:
            _fail(str(e), 1)
    click.echo(f"sweep {parent} finished: {len(rows)} runs; compare them with: "
               f"cifar-exp compare --experiment-name {experiment} --sweep {parent}")


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
    _require_tracking()
    from . import registry
    from .config import default_data_dir
    from .data import DataError, load_cifar100
    from .evaluate import evaluate_model
    from .runs import log_reevaluation

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
    if model_uri.startswith(("models:", "runs:")):
        _require_tracking()
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
    _require_tracking()
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
    _require_tracking()
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
@click.option("--sweep", "sweep_id", metavar="PARENT_RUN_ID", help="Only the runs of this sweep.")
@click.option("--since", help="Only runs started at or after this ISO date, e.g. 2026-12-01.")
@click.option("--filter", "filter_string", help="An MLflow filter string, e.g. \"params.lr = '0.05'\".")
@click.option("--format", "fmt", type=click.Choice(["text", "markdown", "csv", "json"]), default="text", show_default=True)
@click.option("--report", "report_dir", type=click.Path(file_okay=False, path_type=Path), help="Write report.md and plots here.")
@click.option("--log", "log_run", is_flag=True, help="Record the report in a `comparison` run.")
@click.option("--stats/--no-stats", default=True, show_default=True, help="Bootstrap CIs and McNemar (need predictions).")
def compare(experiment_name, metric, family, tag, sweep_id, since, filter_string, fmt, report_dir, log_run, stats) -> None:
    """Rank scratch-CNN runs against ResNet-18 runs, with confidence intervals and a paired test."""
    _require_tracking()
    import tempfile

    from mlflow.exceptions import MlflowException

    from . import compare as C

    try:
        result = C.compare(experiment_name, metric, family, tag, since, filter_string, with_stats=stats, sweep=sweep_id)
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


@cli.command()
@click.option("--backend-store-uri", default="sqlite:///mlflow.db", show_default=True,
              help="Where runs live, e.g. postgresql://user:password@host:5432/mlflow.")
@click.option("--artifacts-destination", default="./mlartifacts", show_default=True,
              help="Where artifacts live, e.g. s3://bucket/prefix (set MLFLOW_S3_ENDPOINT_URL and AWS_* for it).")
@click.option("--host", default="127.0.0.1", show_default=True, help="0.0.0.0 to serve other machines.")
@click.option("--port", type=click.IntRange(1, 65535), default=5000, show_default=True)
@click.option("--allowed-host", "allowed_hosts", multiple=True, help="Another Host header to answer (repeatable).")
@click.option("--workers", type=click.IntRange(1), default=4, show_default=True)
@click.option("--basic-auth", is_flag=True, help="Require users and passwords (mlflow's basic-auth app).")
@click.option("--print", "print_only", is_flag=True, help="Print the mlflow server command and exit.")
def server(backend_store_uri, artifacts_destination, host, port, allowed_hosts, workers, basic_auth, print_only) -> None:
    """Run the team tracking server without Docker: the same `mlflow server` command docker-compose runs."""
    from .server import ServerSettings, redact

    settings = ServerSettings(backend_store_uri, artifacts_destination, host, port, list(allowed_hosts), basic_auth, workers)
    cmd = settings.command()
    click.echo(redact(cmd))
    if print_only:
        return
    local = Path(sys.executable).parent / "mlflow"  # this environment's mlflow, even when it is not on PATH
    if local.exists():
        cmd[0] = str(local)
    os.execvp(cmd[0], cmd)


def main() -> None:
    """Entry point: click's usage errors become one `Error:` line (no usage dump), exit code 2."""
    # MLflow's INFO chatter (creating tables, experiments) would bury our one-line messages. mlflow
    # configures its logger when imported (lazily, below), from this variable.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # A tracking server that restarts is ridden out: each request retries 7 times, waiting 2, 4, ... 64 s
    # (about 2 minutes in all); a server that hangs is given up on after 30 s per request.
    for var, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7"), ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "2"),
                       ("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")):
        os.environ.setdefault(var, value)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    try:
        code = cli.main(prog_name="cifar-exp", standalone_mode=False)
    except click.ClickException as e:
        _fail(e.format_message(), e.exit_code)
    except click.exceptions.Abort:
        _fail("aborted", 130)
    sys.exit(code if isinstance(code, int) else 0)
