"""A production-shaped MLflow on one machine: PostgreSQL backend store, S3 artifact store, tracking server.

`make mlflow` runs it in the foreground and prints the environment to use; tests use `MlflowStack` as a context
manager. Everything is private and temporary: PostgreSQL in its own data dir on a free port of 127.0.0.1 (run as
the `postgres` user when we are root: PostgreSQL refuses to run as root), moto in server mode as the S3 endpoint
(MinIO or real S3 in production, see k8s/), and `mlflow server` on a free port. Stopping removes all of it.

Artifacts are proxied (`--serve-artifacts --artifacts-destination s3://...`): runs log to and models download from
`mlflow-artifacts:/` URIs through the server, so training and serving need only MLFLOW_TRACKING_URI; only the
server holds the S3 keys. (With `--default-artifact-root s3://...` every client would need the S3 endpoint and keys
too.) The same S3 endpoint also has a data bucket for datasets and Ray Train checkpoints (s3:// everywhere).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from pipelines.local_ray import free_port

PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))
ARTIFACT_BUCKET = "endoflow-mlflow"
DATA_BUCKET = "endoflow-data"
REGION = "us-east-1"


class StackError(RuntimeError):
    """A component could not start; the message says which and why."""


class MlflowStack:
    def __init__(self, host: str = "127.0.0.1", mlflow_port: int | None = None):
        self.host = host
        self.work = Path(tempfile.mkdtemp(prefix="efmlflow-"))
        self.pg_port, self.s3_port = free_port(), free_port()
        self.mlflow_port = mlflow_port or free_port()
        self.db_password = secrets.token_hex(16)
        self.processes: list[subprocess.Popen] = []
        self.pg_data = self.work / "pgdata"
        # Fake credentials for moto; real ones come from a Secret in k8s/ (endoflow-s3).
        self.s3_env = {
            "AWS_ACCESS_KEY_ID": "endoflow",
            "AWS_SECRET_ACCESS_KEY": secrets.token_hex(16),
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL": self.s3_url,  # boto3 and pyarrow (Ray Train's storage) both read it
            "MLFLOW_S3_ENDPOINT_URL": self.s3_url,  # what MLflow's own S3 artifact repository reads
        }

    @property
    def s3_url(self) -> str:
        return f"http://{self.host}:{self.s3_port}"

    @property
    def tracking_uri(self) -> str:
        return f"http://{self.host}:{self.mlflow_port}"

    @property
    def database_uri(self) -> str:
        return f"postgresql+psycopg2://mlflow:{self.db_password}@{self.host}:{self.pg_port}/mlflow"

    def env(self) -> dict[str, str]:
        """Everything a client of this stack sets: tracking, and S3 for datasets and checkpoints."""
        return {"MLFLOW_TRACKING_URI": self.tracking_uri, **self.s3_env}

    def __enter__(self) -> MlflowStack:
        try:
            self._start_postgres()
            self._start_s3()
            self._start_mlflow()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- PostgreSQL --------------------------------------------------------------------------------------------

    def _start_postgres(self) -> None:
        for tool in ("initdb", "pg_ctl"):
            if not (PG_BIN / tool).is_file():
                raise StackError(f"PostgreSQL is not installed: no {PG_BIN / tool} (apt-get install postgresql-15)")
        user = "postgres" if os.geteuid() == 0 else None
        self.pg_data.mkdir()
        password_file = self.work / "pgpass"
        password_file.write_text(self.db_password + "\n")
        if user:
            shutil.chown(self.work, user)
            shutil.chown(self.pg_data, user)
            shutil.chown(password_file, user)
        # Local socket: trust (only this user can reach the private socket dir); TCP: password (scram).
        self._run_as(
            user,
            [PG_BIN / "initdb", "-D", self.pg_data, "-U", "mlflow", f"--pwfile={password_file}", "--auth-local=trust"]
            + ["--auth-host=scram-sha-256", "--encoding=UTF8", "--no-instructions"],
            "initdb",
        )
        options = f"-p {self.pg_port} -k {self.work} -c listen_addresses={self.host} -c fsync=off"
        self._run_as(
            user,
            [PG_BIN / "pg_ctl", "-D", self.pg_data, "-o", options, "-l", self.work / "postgres.log", "-w", "start"],
            "pg_ctl start",
        )
        self._pg_user = user
        import psycopg2

        connection = psycopg2.connect(
            host=self.host, port=self.pg_port, user="mlflow", password=self.db_password, dbname="postgres"
        )
        connection.autocommit = True  # CREATE DATABASE refuses to run inside a transaction
        try:
            with connection.cursor() as cursor:
                cursor.execute("CREATE DATABASE mlflow")
        finally:
            connection.close()

    def _run_as(self, user: str | None, command: list, what: str) -> None:
        result = subprocess.run([str(c) for c in command], user=user, capture_output=True, text=True, cwd=self.work)
        if result.returncode != 0:
            raise StackError(f"PostgreSQL {what} failed: {(result.stderr or result.stdout).strip()[-1500:]}")

    def _stop_postgres(self) -> None:
        if (self.pg_data / "postmaster.pid").exists():
            subprocess.run(
                [str(PG_BIN / "pg_ctl"), "-D", str(self.pg_data), "-m", "immediate", "-w", "stop"],
                user=getattr(self, "_pg_user", None),
                capture_output=True,
                cwd=self.work,
            )

    # --- S3 (moto) and the MLflow server -----------------------------------------------------------------------

    def _spawn(self, command: list[str], log_name: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        with open(self.work / log_name, "w") as log:
            process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                cwd=self.work,
                start_new_session=True,  # its own group: stop() signals it and anything it forked
            )
        self.processes.append(process)
        return process

    def _wait_http(self, url: str, process: subprocess.Popen, what: str, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                log = self.work / f"{what}.log"
                raise StackError(f"{what} exited at start:\n{log.read_text(errors='replace')[-2000:]}")
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2):
                return
            if time.monotonic() > deadline:
                raise StackError(f"{what} did not answer {url} within {timeout_s:.0f}s")
            time.sleep(0.3)

    def _start_s3(self) -> None:
        moto = shutil.which("moto_server", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
        if moto is None:
            raise StackError("moto_server not found (pip install 'moto[server]')")
        process = self._spawn([moto, "-H", self.host, "-p", str(self.s3_port)], "moto.log")
        self._wait_http(f"{self.s3_url}/moto-api/", process, "moto")
        import boto3

        s3 = boto3.client(
            "s3",
            endpoint_url=self.s3_url,
            region_name=REGION,
            aws_access_key_id=self.s3_env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.s3_env["AWS_SECRET_ACCESS_KEY"],
        )
        for bucket in (ARTIFACT_BUCKET, DATA_BUCKET):
            s3.create_bucket(Bucket=bucket)

    def _start_mlflow(self) -> None:
        mlflow = str(Path(sys.executable).parent / "mlflow")
        command = [mlflow, "server", "--backend-store-uri", self.database_uri, "--serve-artifacts"]
        command += ["--artifacts-destination", f"s3://{ARTIFACT_BUCKET}/artifacts"]
        command += ["--host", self.host, "--port", str(self.mlflow_port), "--workers", "1"]
        process = self._spawn(command, "mlflow.log", self.s3_env)
        self._wait_http(f"{self.tracking_uri}/health", process, "mlflow")

    def stop(self) -> None:
        for process in reversed(self.processes):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in reversed(self.processes):
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # workers the server forked, even if it exited
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)
        self.processes.clear()
        self._stop_postgres()
        shutil.rmtree(self.work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="MLflow with PostgreSQL and S3 (moto), in the foreground.")
    parser.add_argument("--port", type=int, default=5000, help="the tracking server's port (0: a free one)")
    args = parser.parse_args(argv)
    try:
        stack = MlflowStack(mlflow_port=args.port or None).__enter__()
    except StackError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        print(f"MLflow {stack.tracking_uri}  (PostgreSQL 127.0.0.1:{stack.pg_port}, S3 {stack.s3_url})")
        print(
            f"buckets: s3://{ARTIFACT_BUCKET} (MLflow artifacts, proxied), s3://{DATA_BUCKET} (datasets, checkpoints)"
        )
        print("In another shell:")
        for key, value in stack.env().items():
            print(f"export {key}={value}")
        print("Ctrl-C stops and deletes everything.", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        while all(process.poll() is None for process in stack.processes):
            time.sleep(1)
        print("error: a component exited; see above", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        stack.stop()


if __name__ == "__main__":
    sys.exit(main())
