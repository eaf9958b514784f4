"""The team tracking server's command line, defined once.

`cifar-exp server` and the docker-compose `mlflow` service both build `mlflow server ...` here, so the
two cannot drift apart. This file uses only the standard library (plus boto3 for the bucket), because
the server image copies it alone, without the rest of cifar_exp.

    python server.py             # exec `mlflow server` with the settings in the environment
    python server.py --print     # print that command instead
    python server.py make-bucket # create the artifact bucket if it is missing (compose's one-shot job)
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from dataclasses import dataclass, field

PORT = 5000
# Servers of MLflow 3.5+ answer only these Host headers: the host itself and the compose service name.
ALLOWED_HOSTS = ("localhost", "localhost:{port}", "127.0.0.1", "127.0.0.1:{port}", "mlflow", "mlflow:{port}")


@dataclass
class ServerSettings:
    backend_store_uri: str  # postgresql://user:password@host:5432/db (or sqlite:///file.db)
    artifacts_destination: str  # s3://bucket/prefix or a local folder; clients reach it through the server
    host: str = "0.0.0.0"
    port: int = PORT
    extra_allowed_hosts: list[str] = field(default_factory=list)  # e.g. the team's DNS name
    basic_auth: bool = False  # `--app-name basic-auth`: users and passwords, see the README
    workers: int = 4

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "ServerSettings":
        """The compose file's way in: CIFAR_EXP_SERVER_* variables (the two URIs are required)."""
        env = os.environ if env is None else env
        missing = [k for k in ("CIFAR_EXP_SERVER_BACKEND_STORE_URI", "CIFAR_EXP_SERVER_ARTIFACTS_DESTINATION") if not env.get(k)]
        if missing:
            raise SystemExit(f"Error: set {' and '.join(missing)}")
        extra = env.get("CIFAR_EXP_SERVER_ALLOWED_HOSTS", "")
        return cls(
            backend_store_uri=env["CIFAR_EXP_SERVER_BACKEND_STORE_URI"],
            artifacts_destination=env["CIFAR_EXP_SERVER_ARTIFACTS_DESTINATION"],
            host=env.get("CIFAR_EXP_SERVER_HOST", "0.0.0.0"),
            port=int(env.get("CIFAR_EXP_SERVER_PORT", PORT)),
            extra_allowed_hosts=[h for h in extra.split(",") if h],
            basic_auth=env.get("CIFAR_EXP_SERVER_BASIC_AUTH", "false").lower() in ("1", "true", "yes"),
            workers=int(env.get("CIFAR_EXP_SERVER_WORKERS", 4)),
        )

    def allowed_hosts(self) -> list[str]:
        return [h.format(port=self.port) for h in ALLOWED_HOSTS] + self.extra_allowed_hosts

    def command(self) -> list[str]:
        """`mlflow server` with proxied artifacts: clients need the tracking URI and nothing else."""
        cmd = [
            "mlflow", "server",
            "--backend-store-uri", self.backend_store_uri,
            "--artifacts-destination", self.artifacts_destination,
            "--serve-artifacts",
            "--host", self.host,
            "--port", str(self.port),
            "--workers", str(self.workers),
            "--allowed-hosts", ",".join(self.allowed_hosts()),
        ]
        if self.basic_auth:
            cmd += ["--app-name", "basic-auth"]
        return cmd


def redact(cmd: list[str]) -> str:
    """The command as text, with the database password hidden."""
    text = shlex.join(cmd)
    for part in cmd:
        if "://" in part and "@" in part:
            scheme, rest = part.split("://", 1)
            creds, host = rest.rsplit("@", 1)
            if ":" in creds:
                text = text.replace(part, f"{scheme}://{creds.split(':', 1)[0]}:***@{host}")
    return text


def make_bucket(destination: str, endpoint_url: str | None = None, wait_seconds: float = 60) -> str:
    """Create the bucket of an s3:// destination if it is missing, waiting for the store to come up."""
    import boto3
    from botocore.exceptions import ClientError, EndpointConnectionError

    bucket = destination.removeprefix("s3://").split("/", 1)[0]
    s3 = boto3.client("s3", endpoint_url=endpoint_url or os.environ.get("MLFLOW_S3_ENDPOINT_URL"))
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            s3.head_bucket(Bucket=bucket)
            return f"bucket {bucket} exists"
        except ClientError as e:
            if e.response["Error"]["Code"] not in ("404", "NoSuchBucket"):
                raise
            s3.create_bucket(Bucket=bucket)
            return f"bucket {bucket} created"
        except EndpointConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(2)  # the object store is still starting


def main(argv: list[str]) -> None:
    settings = ServerSettings.from_env()
    if argv[:1] == ["make-bucket"]:
        print(make_bucket(settings.artifacts_destination), flush=True)
        return
    cmd = settings.command()
    print(redact(cmd), flush=True)
    if argv[:1] != ["--print"]:
        os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    main(sys.argv[1:])
