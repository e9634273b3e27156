"""A real deployment on loopback, driven from Python (tests, benchmarks): a SuperLink with
TLS and SuperNode authentication, SuperNodes as separate processes each reading its own
device directory, and `flwr run . <connection>`. Every process it starts, it stops.

The commands are the ones docs/deployment.md gives for a deployment across machines.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from flwr.cli.utils import SUPERLINK_UNAVAILABLE_MESSAGE

from server.certificates import make_certificates
from simulations.flower_runner import REPO, toml_value

CONNECTION = "fedrec-tls"


def wait_until_free(port: int, timeout: float = 30) -> None:
    """Wait for a port on 127.0.0.1 to be free (a previous deployment may still be exiting)."""
    deadline = time.time() + timeout
    while True:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is no obstacle
            try:
                probe.bind(("127.0.0.1", port))
                return
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError(f"port {port} on 127.0.0.1 is in use (another SuperLink?); stop it first") from None
        time.sleep(1)


@dataclass
class Deployment:
    root: Path
    port: int = 19193
    nodes: int = 3
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.certs = make_certificates(self.root / "certs", self.nodes + 1, ["localhost", "127.0.0.1"])
        self.home = self.root / "home"
        self.home.mkdir(exist_ok=True)
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\nroot-certificates = "{self.certs["ca-cert"]}"\n')

    def env(self, home: Path) -> dict[str, str]:
        env = dict(os.environ)
        env.update(FLWR_HOME=str(home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", HF_HUB_OFFLINE="1",
                   PYTHONUNBUFFERED="1")  # logs complete up to a kill
        return env

    def _start(self, name: str, command: list[str], home: Path) -> subprocess.Popen:
        workdir = self.root / "cwd" / name
        workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.root / f"{name}.log", "w")
        proc = subprocess.Popen(command, cwd=workdir, env=self.env(home), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.processes[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text()

    def start_superlink(self) -> None:
        """flower-superlink with TLS, SuperNode authentication and a persistent database.

        Returns at once: every `flwr` command after it waits for the SuperLink (see `cli`).
        """
        wait_until_free(self.port)
        self._start("superlink", [
            "flower-superlink", "--ssl-ca-certfile", str(self.certs["ca-cert"]),
            "--ssl-certfile", str(self.certs["superlink-cert"]), "--ssl-keyfile", str(self.certs["superlink-key"]),
            "--enable-supernode-auth", "--database", str(self.root / "superlink.db"),
            "--host", "127.0.0.1", "--port", str(self.port)], self.home)

    def cli(self, *args: str, timeout: float = 300, ready_within: float = 90) -> subprocess.CompletedProcess:
        """A `flwr` command against this deployment (args name the connection where needed).

        Readiness is checked by the command itself: while the SuperLink is starting (or
        one of its APIs is not serving yet) `flwr` answers "unavailable", and the command
        is retried until `ready_within` seconds have passed. A SuperLink that exited is
        reported with its log.
        """
        deadline = time.time() + ready_within
        while True:
            done = subprocess.run(["flwr", *args], cwd=REPO, env=self.env(self.home), capture_output=True,
                                  text=True, timeout=timeout)
            if SUPERLINK_UNAVAILABLE_MESSAGE[:40] not in done.stdout + done.stderr:
                return done
            superlink = self.processes.get("superlink")
            if superlink is not None and superlink.poll() is not None:
                raise RuntimeError(f"the SuperLink exited ({superlink.returncode}):\n{self.log('superlink')[-3000:]}")
            if time.time() > deadline:
                log = self.log("superlink")[-3000:] if superlink is not None else "(not started here)"
                raise RuntimeError(f"`flwr {' '.join(args)}`: the SuperLink was unavailable for {ready_within:.0f} s:\n"
                                   f"{log}")
            time.sleep(1)

    def register(self, node: int) -> int:
        """`flwr supernode register <public key>`: returns the node id."""
        done = self.cli("supernode", "register", str(self.certs[f"node-{node}-pub"]), CONNECTION)
        match = re.search(r"(\d{6,})", done.stdout)
        if done.returncode != 0 or not match:
            raise RuntimeError(f"registering node {node} failed: {done.stdout}{done.stderr}")
        return int(match.group(1))

    def node_home(self, node: int) -> Path:
        """The FLWR_HOME of one SuperNode (its processes carry it in their environment)."""
        home = self.root / f"home-node-{node}"
        home.mkdir(exist_ok=True)
        return home

    def start_supernode(self, node: int, data_dir: Path) -> subprocess.Popen:
        """flower-supernode for one device, with its own key, port, FLWR_HOME and data directory."""
        home = self.node_home(node)
        return self._start(f"node-{node}", [
            "flower-supernode", "--superlink", f"127.0.0.1:{self.port}",
            "--root-certificates", str(self.certs["ca-cert"]),
            "--auth-supernode-private-key", str(self.certs[f"node-{node}-key"]),
            "--node-config", f"data-dir={toml_value(str(data_dir))}",
            "--host", "127.0.0.1", "--port", str(self.port + 1 + node)], home)

    def run(self, run_config: dict) -> int:
        """`flwr run . <connection> --run-config ...`; returns the run id (the run goes on)."""
        overrides = " ".join(f"{k}={toml_value(v)}" for k, v in run_config.items())
        done = self.cli("run", str(REPO), CONNECTION, "--run-config", overrides, "--format", "json")
        try:
            return int(json.loads(done.stdout)["run-id"])
        except (json.JSONDecodeError, KeyError):
            raise RuntimeError(f"flwr run failed: {done.stdout}{done.stderr}") from None

    def status(self, run_id: int) -> str:
        done = self.cli("ls", CONNECTION, "--run-id", str(run_id), "--format", "json")
        try:
            return json.loads(done.stdout)["runs"][0]["status"]
        except (json.JSONDecodeError, KeyError, IndexError):
            return "unknown"

    def wait(self, run_id: int, timeout: float = 900) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            status = self.status(run_id)
            if status.startswith("finished"):
                return status
            time.sleep(10)  # each `flwr ls` is a Python start-up: do not steal the run's CPU
        return "timed out"

    def run_log(self, run_id: int) -> str:
        done = self.cli("log", str(run_id), CONNECTION, "--show")
        return done.stdout + done.stderr

    def stop_run(self, run_id: int) -> None:
        self.cli("stop", str(run_id), CONNECTION)

    def kill(self, name: str) -> None:
        """SIGKILL a process and its children (a device that dies)."""
        proc = self.processes.pop(name)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)

    def close(self) -> None:
        for name, proc in list(self.processes.items()):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        deadline = time.time() + 15
        for name in list(self.processes):
            proc = self.processes[name]
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                self.kill(name)
        self.processes.clear()

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
