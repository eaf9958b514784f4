# The team tracking server: MLflow pinned to the version the project uses, plus the PostgreSQL
# driver and boto3 the official image lacks. server.py is the one definition of its command line.
FROM python:3.11-slim

ARG MLFLOW_VERSION=3.17.2
RUN pip install --no-cache-dir "mlflow[auth]==${MLFLOW_VERSION}" "psycopg[binary]==3.*" "boto3==1.*"

COPY cifar_exp/server.py /opt/cifar_exp/server.py
RUN useradd --create-home mlflow && mkdir -p /var/lib/mlflow-auth && chown mlflow /var/lib/mlflow-auth
USER mlflow
# The basic-auth app keeps its users in ./basic_auth.db; compose mounts a volume here so they persist.
WORKDIR /var/lib/mlflow-auth
EXPOSE 5000
CMD ["python", "/opt/cifar_exp/server.py"]
