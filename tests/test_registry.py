"""Issue 5: register, promote, load by every URI form, predict on files, serve over HTTP."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import mlflow
import numpy as np
import pytest
import torch
from conftest import reset_mlflow_state, run_cli
from mlflow import MlflowClient
from PIL import Image

from cifar_exp import registry
from cifar_exp import train as T
from cifar_exp.config import TrainConfig
from cifar_exp.runs import mlflow_run

X = np.random.default_rng(7).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def store(tmp_path_factory, data_root):
    """A sqlite store with one tiny trained cnn; yields (uri, train result, run id)."""
    tmp = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)  # the store's artifacts go to ./mlruns
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        reset_mlflow_state()
        mlflow.set_tracking_uri(uri)
        cfg = TrainConfig(width=16, epochs=1, batch_size=32, lr=0.05, data_dir=str(data_root), download=False,
                          device="cpu", experiment_name="reg")
        with mlflow_run(cfg) as tracker:
            result = T.run(cfg, tracker, workdir=tmp / "ck")
        reset_mlflow_state()
        yield uri, result, tracker.run_id
        mlflow.set_tracking_uri(None)


@pytest.fixture
def client(store, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store[0])
    mlflow.set_tracking_uri(store[0])
    return MlflowClient(store[0])


def _metrics(acc):
    return {"test_accuracy": acc, "test_macro_f1": acc / 2}


def _aliases(client, name):
    return {a: int(v) for a, v in client.get_registered_model(name).aliases.items()}


def test_champion_challenger_rules(store, client):
    _, result, run_id = store
    name = "rules"
    first = registry.register(result.model_uri, name, "cnn", _metrics(0.50), run_id)
    assert first.version == 1 and first.aliases == ["challenger", "champion"]
    assert _aliases(client, name) == {"champion": 1, "challenger": 1}
    better = registry.register(result.model_uri, name, "cnn", _metrics(0.60), run_id)
    assert better.aliases == ["challenger", "champion"] and _aliases(client, name) == {"champion": 2, "challenger": 2}
    worse = registry.register(result.model_uri, name, "cnn", _metrics(0.55), run_id)
    assert worse.aliases == ["challenger"] and worse.previous_champion == 2
    assert _aliases(client, name) == {"champion": 2, "challenger": 3}
    tie = registry.register(result.model_uri, name, "cnn", _metrics(0.60), run_id)
    assert _aliases(client, name) == {"champion": 2, "challenger": 4}  # must beat, not equal
    v = client.get_model_version(name, "3")
    assert v.tags == {"model_family": "cnn", "source_run_id": run_id, "test_accuracy": "0.550000",
                      "test_macro_f1": "0.275000"}
    assert tie.version == 4

    registry.promote(name, 3)
    assert _aliases(client, name)["champion"] == 3
    rows = registry.list_versions(name)
    assert [r["version"] for r in rows] == [4, 3, 2, 1]
    assert rows[1]["aliases"] == ["champion"] and rows[1]["test_accuracy"] == pytest.approx(0.55)


def test_failed_promotion_leaves_aliases(store, client, monkeypatch):
    _, result, run_id = store
    registry.register(result.model_uri, "safe", "cnn", _metrics(0.5), run_id)
    registry.register(result.model_uri, "safe", "cnn", _metrics(0.4), run_id)
    before = _aliases(client, "safe")
    with pytest.raises(registry.ModelError, match="has no version 9"):
        registry.promote("safe", 9)
    assert _aliases(client, "safe") == before
    # A failure half-way through moving two aliases puts the first one back.
    real = MlflowClient.set_registered_model_alias
    calls = []

    def flaky(self, name, alias, version):
        calls.append(alias)
        if len(calls) == 2:
            raise RuntimeError("server went away")
        return real(self, name, alias, version)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", flaky)
    with pytest.raises(RuntimeError):
        registry.set_aliases("safe", {"challenger": 1, "champion": 2})
    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", real)
    assert _aliases(client, "safe") == before


def test_every_uri_form_loads_in_a_fresh_process_without_pickle(store, client, tmp_path):
    uri, result, run_id = store
    registry.register(result.model_uri, "forms", "cnn", _metrics(0.5), run_id)
    expected = result.model(torch.from_numpy(X)).detach().numpy()
    np.save(tmp_path / "x.npy", X)
    uris = ["models:/forms@champion", "models:/forms/1", result.model_uri]
    code = f"""
import json, sys, numpy as np, mlflow, torch
x = np.load({str(tmp_path / 'x.npy')!r})
out = {{}}
for uri in {uris!r}:
    p = mlflow.pyfunc.load_model(uri).predict(x)
    t = mlflow.pytorch.load_model(uri)(torch.from_numpy(x)).detach().numpy()
    out[uri] = [p.tolist(), t.tolist()]
print(json.dumps(out))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={"MLFLOW_TRACKING_URI": uri, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false",
                            "PATH": os.environ["PATH"]})
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for u in uris:
        pyfunc, module = (np.array(a) for a in out[u])
        assert pyfunc.shape == (3, 100) and np.allclose(pyfunc.sum(1), 1, atol=1e-5)
        assert np.allclose(pyfunc, expected, atol=1e-5) and np.allclose(module, expected, atol=1e-5), u


def test_wrong_images_are_refused_clearly(store, client):
    model = registry.load(store[1].model_uri)
    with pytest.raises(ValueError, match=r"shape \(N, 32, 32, 3\), got \(2, 3, 32, 32\)"):
        registry.predict(model, np.zeros((2, 3, 32, 32), np.uint8))
    with pytest.raises(ValueError, match="must be uint8 RGB values 0..255, got dtype float32"):
        registry.predict(model, np.zeros((2, 32, 32, 3), np.float32))
    top = registry.predict(model, X, top_k=3)
    assert len(top) == 3 and all(len(t) == 3 for t in top)
    assert all(t[0][1] >= t[1][1] >= t[2][1] for t in top) and top[0][0][0].startswith("class_")


@pytest.mark.slow
def test_predict_command_on_image_files(store, client, tmp_path):
    paths = []
    for i, (mode, size, ext) in enumerate([("RGB", (32, 32), "png"), ("RGBA", (64, 48), "png"),
                                           ("L", (100, 100), "png"), ("RGB", (300, 200), "jpg")]):
        p = tmp_path / f"img{i}.{ext}"
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).convert(mode).save(p)
        paths.append(str(p))
    r = run_cli("predict", "--model-uri", store[1].model_uri, "--format", "json", "--top-k", "3", *paths)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [o["image"] for o in out] == paths
    for o in out:
        probs = [t["probability"] for t in o["top_k"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
        assert all(t["class"].startswith("class_") for t in o["top_k"])
    r = run_cli("predict", "--model-uri", store[1].model_uri, paths[0])
    assert r.returncode == 0 and r.stdout.startswith(f"{paths[0]}: class_")
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    r = run_cli("predict", "--model-uri", store[1].model_uri, str(bad))
    assert r.returncode == 2 and r.stderr.strip() == f"Error: {bad} is not a readable image (UnidentifiedImageError): use PNG or JPEG files"


@pytest.mark.slow
def test_bad_model_references(store, client, tmp_path):
    registry.register(store[1].model_uri, "known", "cnn", _metrics(0.5), store[2])
    img = tmp_path / "img.png"
    Image.fromarray(X[0]).save(img)
    for uri, fragment in [("models:/nope@champion", "Registered Model with name=nope not found"),
                          ("models:/known/7", "version"),
                          ("models:/known@nobody", "alias")]:
        with pytest.raises(registry.ModelError, match=f"^no loadable model at {uri}: .*{fragment}"):
            registry.load(uri)
    r = run_cli("predict", "--model-uri", "models:/nope@champion", str(img))
    assert r.returncode == 2 and r.stderr.startswith("Error: no loadable model at models:/nope@champion: ")
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_cli("promote", "known", "5")
    assert r.returncode == 2 and r.stderr.strip() == "Error: model 'known' has no version 5"
    r = run_cli("models", "unknown-name")
    assert r.returncode == 2 and r.stderr.strip() == "Error: no registered model named 'unknown-name'"
    r = run_cli("models", "known")
    assert r.returncode == 0 and "champion" in r.stdout and "0.5000" in r.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_mlflow_models_serve_answers_invocations(store, client):
    registry.register(store[1].model_uri, "served", "cnn", _metrics(0.5), store[2])
    port = _free_port()
    # `mlflow models serve` starts uvicorn from PATH, as an activated environment has it.
    env = {**os.environ, "MLFLOW_TRACKING_URI": store[0], "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false",
           "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/served@champion",
                               "--env-manager", "local", "--host", "127.0.0.1", "-p", str(port)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    pytest.fail(f"server did not come up: {server.stdout.read() if server.poll() is not None else ''}")
                time.sleep(1)
        # Exactly the README's curl call, made with urllib.
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps({"inputs": X.tolist()}).encode(),
                                     headers={"Content-Type": "application/json"})
        preds = np.array(json.loads(urllib.request.urlopen(req, timeout=60).read())["predictions"])
        assert preds.shape == (3, 100) and np.allclose(preds.sum(1), 1, atol=1e-5)
        expected = store[1].model(torch.from_numpy(X)).detach().numpy()
        assert np.allclose(preds, expected, atol=1e-5)
    finally:
        server.terminate()
        server.wait(timeout=30)
