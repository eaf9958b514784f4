"""The README's bad-input table, row by row: one clear line, exit code 2, no traceback, no run left RUNNING."""

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from conftest import ROOT
from fakedata import write_fake_cifar100, write_split
from mlflow import MlflowClient

from cifar_exp.cli import main
from cifar_exp.models import build_model

TINY = ["--width", "16", "--batch-size", "32", "--device", "cpu", "--download", "false", "--epochs", "1"]


@dataclass
class Ctx:
    data: Path  # good synthetic CIFAR-100
    tmp: Path

    def train(self, *args: str) -> list[str]:
        return ["train", "--data-dir", str(self.data), *TINY, *args]

    def broken_data(self, split: str = "train", **overrides) -> str:
        folder = write_fake_cifar100(self.tmp / "broken")
        write_split(folder / split, np.repeat(np.arange(100), 4), seed=1, **overrides)
        return str(self.tmp / "broken")

    def file(self, name: str, content: str | bytes) -> str:
        path = self.tmp / name
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return str(path)


def _truncated(c: Ctx) -> list[str]:
    folder = write_fake_cifar100(c.tmp / "cut")
    blob = (folder / "test").read_bytes()
    (folder / "test").write_bytes(blob[: len(blob) // 3])
    return c.train("--data-dir", str(c.tmp / "cut"))


def _wrong_arch(c: Ctx) -> list[str]:
    path = c.tmp / "cnn.pt"
    torch.save(build_model("cnn", 100, 8).state_dict(), path)
    return c.train("--model", "resnet18", "--pretrained", str(path))


def _wrong_layout(c: Ctx) -> list[str]:
    (c.tmp / "wrong" / "cifar100").mkdir(parents=True)
    return c.train("--data-dir", str(c.tmp / "wrong"))


def _unreachable(c: Ctx) -> list[str]:
    mlflow.set_tracking_uri("http://127.0.0.1:9")  # the discard port: nothing listens there
    return c.train()


def _deleted_experiment(c: Ctx) -> list[str]:
    client = MlflowClient()
    client.delete_experiment(client.create_experiment("gone"))
    return c.train("--experiment-name", "gone")


# (README row, command, the exact line or a regex for it)
CASES = [
    ("an unknown model", lambda c: c.train("--model", "vgg"),
     "Error: Invalid value for '--model': 'vgg' is not one of 'cnn', 'resnet18'."),
    ("a negative lr", lambda c: c.train("--lr", "-1"), "Error: lr: Input should be greater than 0 (got -1.0)"),
    ("a zero lr", lambda c: c.train("--lr", "0"), "Error: lr: Input should be greater than 0 (got 0.0)"),
    ("epochs 0", lambda c: c.train("--epochs", "0"),
     "Error: epochs: Input should be greater than or equal to 1 (got 0)"),
    ("a batch larger than the dataset", lambda c: c.train("--batch-size", "5000"),
     "Error: batch_size: 5000 is larger than the training split (360 images)"),
    ("a val fraction out of range", lambda c: c.train("--val-fraction", "1.5"),
     "Error: val_fraction: Input should be less than 1 (got 1.5)"),
    ("a flag of the wrong type", lambda c: c.train("--epochs", "two"),
     "Error: Invalid value for '--epochs': 'two' is not a valid integer."),
    ("an unknown config key", lambda c: c.train("--config", c.file("c.yaml", "modle: cnn\n")),
     re.compile(r"Error: modle: unknown config key; allowed keys: model, width, pretrained, .*, register_as")),
    ("a malformed config file", lambda c: c.train("--config", c.file("c.yaml", "model: [cnn\n")),
     re.compile(r"Error: config file .*c\.yaml: not valid YAML \(while parsing a flow sequence\)")),
    ("a data dir that does not exist", lambda c: c.train("--data-dir", str(c.tmp / "missing")),
     re.compile(r"Error: data dir .*missing does not exist; create it with CIFAR-100 in it, or allow download")),
    ("a data dir with the wrong layout", _wrong_layout,
     re.compile(r"Error: data dir .*wrong does not hold CIFAR-100: it needs cifar-100-python/ \(with train, test, "
                r"meta\) or cifar-100-python.tar.gz, and has \['cifar100'\]; fix the layout or allow download")),
    ("a truncated pickle", _truncated,
     re.compile(r"Error: .*cifar-100-python/test is truncated or corrupt \(.*\): delete .* and extract "
                r"cifar-100-python.tar.gz again")),
    ("labels out of range", lambda c: c.train("--data-dir", c.broken_data(fine_labels=[100] * 400)),
     re.compile(r"Error: .*/train: 'fine_labels' out of range \[0, 99\] \(min 100, max 100\)")),
    ("a pretrained path to a missing file", lambda c: c.train("--model", "resnet18", "--pretrained", str(c.tmp / "no.pt")),
     re.compile(r"Error: pretrained weights .*no\.pt do not exist; pass 'imagenet', 'none' or a state-dict file")),
    ("a pretrained path to the wrong architecture", _wrong_arch,
     re.compile(r"Error: pretrained .*cnn\.pt: weights do not fit ResNet: missing 120 \[.*\], unexpected 40 \[.*\], wrong shape 0 \[\]")),
    ("an unreachable tracking URI", _unreachable,
     re.compile(r"Error: tracking server http://127.0.0.1:9 is unreachable: .*refused.*; start it "
                r"\(`docker compose up` or `cifar-exp server`\) or set MLFLOW_TRACKING_URI to a running one")),
    ("a deleted experiment", _deleted_experiment,
     re.compile(r"Error: experiment 'gone' is deleted; restore it \(mlflow experiments restore --experiment-id \d+\) "
                r"or choose another --experiment-name")),
    ("an unknown experiment for compare", lambda c: ["compare", "--experiment-name", "ghost"],
     "Error: experiment 'ghost' not found; experiments here: Default"),
    ("an unknown run id for resume", lambda c: ["train", "--resume", "nope"],
     re.compile(r"Error: --resume: run id 'nope' not found in sqlite:///.*; copy the id from the run's "
                r"resume_command tag")),
    ("an unknown run id for evaluate", lambda c: ["evaluate", "--run-id", "nope"],
     re.compile(r"Error: run id 'nope' not found in sqlite:///.*mlflow\.db; is MLFLOW_TRACKING_URI the store that has it\?")),
    ("an image file that is not an image, for predict",
     lambda c: ["predict", "--model-uri", "models:/m@champion", c.file("cat.png", "not a png")],
     re.compile(r"Error: .*cat\.png is not a readable image \(UnidentifiedImageError\): use PNG or JPEG files")),
]


def _run_main(args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["cifar-exp", *args])
    with pytest.raises(SystemExit) as e:
        main()
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("problem, command, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input(problem, command, message, data_root, tmp_path, tracking_uri, monkeypatch, capsys):
    code, err = _run_main(command(Ctx(data_root, tmp_path)), monkeypatch, capsys)
    line = err.strip()
    assert code == 2, err
    assert "\n" not in line and "Traceback" not in err
    if isinstance(message, str):
        assert line == message
    else:
        assert message.fullmatch(line), line
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert not runs  # none created, so none left RUNNING


def test_readme_table_lists_exactly_these_cases():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Bad input")[1].split("\n## ")[0]
    rows = [line.split("|")[1].strip() for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[1:] == [c[0] for c in CASES]  # rows[0] is the header
