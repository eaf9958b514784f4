"""docker-compose.yml, .env.example and the server image, checked without a Docker engine."""

import re
import tomllib

import pytest
import yaml
from click.testing import CliRunner
from conftest import ROOT

from cifar_exp.cli import cli
from cifar_exp.server import ServerSettings, redact

TEXT = (ROOT / "docker-compose.yml").read_text()
COMPOSE = yaml.safe_load(TEXT)
SERVICES = COMPOSE["services"]
ENV_EXAMPLE = dict(
    line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines() if line and not line.startswith("#")
)
SECRETS = [k for k in ENV_EXAMPLE if re.search(r"USER|PASSWORD|SECRET|KEY", k)]


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's rules: ${VAR}, ${VAR:-default}, ${VAR:?message} (an error when unset or empty), $$ = $."""

    def sub(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if env.get(name):
            return env[name]
        if op == ":?":
            raise KeyError(f"{name}: {arg}")
        return arg if op == ":-" else ""

    return re.sub(r"\$\{(\w+)(?:(:\?|:-)([^}]*))?\}", sub, value.replace("$$", "\0")).replace("\0", "$")


def _resolved(service: str) -> dict[str, str]:
    return {k: interpolate(str(v), ENV_EXAMPLE) for k, v in SERVICES[service]["environment"].items()}


def test_services_and_start_order():
    assert set(SERVICES) == {"postgres", "storage", "create-bucket", "mlflow"}
    assert SERVICES["mlflow"]["depends_on"] == {"postgres": {"condition": "service_healthy"},
                                                "create-bucket": {"condition": "service_completed_successfully"}}
    assert SERVICES["create-bucket"]["command"][-1] == "make-bucket" and SERVICES["create-bucket"]["restart"] == "no"


def test_healthchecks():
    assert "pg_isready" in " ".join(SERVICES["postgres"]["healthcheck"]["test"])
    assert "http://localhost:5000/health" in " ".join(SERVICES["mlflow"]["healthcheck"]["test"])


def test_named_volumes_keep_the_data():
    assert set(COMPOSE["volumes"]) == {"postgres-data", "storage-data", "auth-data"}
    assert SERVICES["mlflow"]["volumes"] == ["auth-data:/var/lib/mlflow-auth"]
    assert "postgres-data:/var/lib/postgresql/data" in SERVICES["postgres"]["volumes"]
    assert "storage-data:/data" in SERVICES["storage"]["volumes"]


def test_only_mlflow_is_published():
    assert [name for name, s in SERVICES.items() if "ports" in s] == ["mlflow"]
    assert [interpolate(p, ENV_EXAMPLE) for p in SERVICES["mlflow"]["ports"]] == ["5000:5000"]


@pytest.mark.parametrize("name", SECRETS)
def test_every_credential_comes_from_env_and_fails_fast_when_missing(name):
    uses = re.findall(r"(?<!\$)\$\{" + name + r"(\W\W?)", TEXT)  # $${...} is the container shell's
    assert uses and all(u == ":?" for u in uses), f"{name} must be used as ${{{name}:?message}}"
    with pytest.raises(KeyError, match=rf"{name}: set {name} in \.env"):
        interpolate(TEXT, {k: v for k, v in ENV_EXAMPLE.items() if k != name})


def test_env_example_fills_every_variable_and_no_password_is_in_the_compose_file():
    resolved = interpolate(TEXT.replace("$$", ""), ENV_EXAMPLE)  # $$ escapes are for the container shell
    assert "${" not in resolved
    for name in SECRETS:
        if re.search(r"PASSWORD|SECRET", name):
            assert ENV_EXAMPLE[name] not in TEXT


def test_the_compose_server_is_the_cifar_exp_server_command():
    assert SERVICES["mlflow"]["command"] == ["python", "/opt/cifar_exp/server.py"]
    settings = ServerSettings.from_env(_resolved("mlflow"))
    cmd = settings.command()
    assert cmd[:2] == ["mlflow", "server"]
    assert cmd[cmd.index("--backend-store-uri") + 1] == "postgresql://mlflow:change-me-postgres@postgres:5432/mlflow"
    assert cmd[cmd.index("--artifacts-destination") + 1] == "s3://mlflow-artifacts"
    assert "--serve-artifacts" in cmd and cmd[cmd.index("--host") + 1] == "0.0.0.0" and cmd[cmd.index("--port") + 1] == "5000"
    assert {"localhost:5000", "127.0.0.1:5000", "mlflow", "mlflow:5000"} <= set(cmd[cmd.index("--allowed-hosts") + 1].split(","))
    assert "--app-name" not in cmd
    # `cifar-exp server` with the same values prints the very same command line.
    out = CliRunner().invoke(cli, ["server", "--print", "--backend-store-uri", settings.backend_store_uri,
                                   "--artifacts-destination", settings.artifacts_destination, "--host", "0.0.0.0",
                                   "--port", "5000"])
    assert out.exit_code == 0 and out.output.strip() == redact(cmd)
    assert "change-me-postgres" not in out.output  # the password is not printed


def test_basic_auth_is_opt_in():
    env = {**_resolved("mlflow"), "CIFAR_EXP_SERVER_BASIC_AUTH": "true"}
    assert ServerSettings.from_env(env).command()[-2:] == ["--app-name", "basic-auth"]
    out = CliRunner().invoke(cli, ["server", "--print", "--basic-auth"])
    assert out.output.strip().endswith("--app-name basic-auth")


def test_the_image_pins_the_project_mlflow_and_carries_server_py():
    dockerfile = (ROOT / "docker" / "mlflow.Dockerfile").read_text()
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (mlflow_pin,) = [d for d in deps if d.startswith("mlflow==")]
    version = mlflow_pin.split("==")[1]
    assert f"ARG MLFLOW_VERSION={version}" in dockerfile and '"mlflow[auth]==${MLFLOW_VERSION}"' in dockerfile
    assert "psycopg[binary]" in dockerfile and "boto3" in dockerfile
    assert "COPY cifar_exp/server.py /opt/cifar_exp/server.py" in dockerfile
    for name in ("mlflow", "create-bucket"):
        assert SERVICES[name]["build"] == {"context": ".", "dockerfile": "docker/mlflow.Dockerfile"}
        assert SERVICES[name]["image"] == f"cifar-exp-mlflow:{version}"
