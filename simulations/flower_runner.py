"""Run the Flower app with `flwr run` from Python (tests, benchmarks) and clean up after it.

Flower's (1.41, 1.42) `flwr run .` starts a local SuperLink (and its SuperExec, simulation and Ray
processes) in the background and leaves it running. This runner gives every run its own
FLWR_HOME, turns off Flower's per-run `uv sync` of the app's dependencies (they are
installed already), waits for the run, reads its real status with `flwr ls`, and stops
every process that carries its FLWR_HOME.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent
LOCAL_SUPERLINK_HEALTH = "http://127.0.0.1:39091/health"


@dataclass
class FlowerRun:
    run_id: int | None
    status: str
    log: str
    peak_rss_bytes: int = 0  # of all the run's processes together, sampled every second

    @property
    def ok(self) -> bool:
        return self.status == "finished:completed"


def app_run_config(**overrides) -> dict:
    """The app's run config as pyproject.toml declares it, with overrides (like --run-config)."""
    import tomllib

    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    unknown = set(overrides) - set(config)
    if unknown:
        raise KeyError(f"unknown run-config keys {sorted(unknown)}")
    return {**config, **overrides}


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def parse_overrides(pairs: list[str]) -> dict:
    """'key=value' pairs, values parsed as TOML would (numbers, booleans, strings)."""
    out = {}
    for pair in pairs:
        key, _, raw = pair.partition("=")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def flower_env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(FLWR_HOME=str(flwr_home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", HF_HUB_OFFLINE="1",
               RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0")
    return env


LOCAL_SUPERLINK_LOCK = Path(tempfile.gettempdir()) / "fedrec-local-superlink.lock"


@contextlib.contextmanager
def local_superlink_turn(lock_path: Path = LOCAL_SUPERLINK_LOCK) -> Iterator[None]:
    """This process's turn at the local SuperLink: `flwr run` starts it on a fixed port, so a
    second run on the machine (a benchmark, another test worker) waits for the first to end
    instead of failing on the port."""
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def local_superlink_running() -> bool:
    try:
        return httpx.get(LOCAL_SUPERLINK_HEALTH, timeout=1.0).is_success
    except httpx.HTTPError:
        return False


def processes_of(flwr_home: Path) -> list[psutil.Process]:
    """Every process whose environment names this FLWR_HOME (all that a run started)."""
    mine = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.pid != os.getpid() and proc.environ().get("FLWR_HOME") == str(flwr_home):
                mine.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return mine


def total_rss(processes: list[psutil.Process], proportional: bool = False) -> int:
    """Summed resident memory; proportional: PSS, pages shared between the processes
    counted once in all (slower to read)."""
    total = 0
    for proc in processes:
        try:
            total += proc.memory_full_info().pss if proportional else proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return total


def stop_processes_of(flwr_home: Path) -> int:
    """Kill every process of this FLWR_HOME and all their descendants (Ray's agents rename
    themselves and outlive their parents); returns how many."""
    mine = processes_of(flwr_home)
    for proc in list(mine):
        try:
            mine += [child for child in proc.children(recursive=True) if child not in mine]
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    for proc in mine:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(mine, timeout=10)
    for proc in alive:  # Ray's agents ignore SIGTERM
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)
    return len(mine)


@local_superlink_turn()
def run_flower(
    run_config: dict,
    num_supernodes: int,
    cpus_per_client: int = 1,
    flwr_home: Path | None = None,
    app_dir: Path = REPO,
    echo: bool = False,
    timeout: float = 3600,
    crash_when: Callable[[], bool] | None = None,
) -> FlowerRun:
    """`flwr run app_dir --stream` with the given overrides, in this process's turn at the
    local SuperLink (the decorator); always stops what it started.

    crash_when: polled every second; once it returns True, every process of the run is
    killed at once (a crash, status "crashed"), to test resuming.
    """
    if local_superlink_running():
        raise RuntimeError("a local SuperLink already runs on 127.0.0.1:39091; stop it first "
                           "(pkill -f flower-superlink)")
    home = Path(flwr_home or tempfile.mkdtemp(prefix="flwr-home-"))
    command = ["flwr", "run", str(app_dir), "--stream", "--federation-config",
               f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus_per_client}"]
    if run_config:
        command += ["--run-config", " ".join(f"{k}={toml_value(v)}" for k, v in run_config.items())]
    lines: list[str] = []
    status, peak = None, 0
    try:
        with subprocess.Popen(command, cwd=app_dir, env=flower_env(home), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) as proc:
            reader = threading.Thread(target=_collect, args=(proc.stdout, lines, echo), daemon=True)
            reader.start()
            deadline = time.monotonic() + timeout
            while proc.poll() is None:
                if crash_when is not None and crash_when():
                    stop_processes_of(home)
                    proc.kill()
                    status = "crashed"
                elif time.monotonic() > deadline:
                    proc.kill()
                    status = "timed out"
                peak = max(peak, total_rss(processes_of(home)))
                time.sleep(1.0)
            reader.join(timeout=10)
        log = "".join(lines)
        match = re.search(r"Successfully started run (\d+)", log)
        run_id = int(match.group(1)) if match else None
        if status is None:
            status = run_status(home, run_id) if run_id else "not started"
        return FlowerRun(run_id, status, log, peak)
    finally:
        stop_processes_of(home)


def _collect(stream, lines: list[str], echo: bool) -> None:
    for line in stream:
        lines.append(line)
        if echo:
            sys.stdout.write(line)
            sys.stdout.flush()


def run_status(flwr_home: Path, run_id: int) -> str:
    out = subprocess.run(["flwr", "ls", "--run-id", str(run_id), "--format", "json"], env=flower_env(flwr_home),
                         capture_output=True, text=True, cwd=REPO)
    try:
        return json.loads(out.stdout)["runs"][0]["status"]
    except (json.JSONDecodeError, KeyError, IndexError):
        return f"unknown ({out.stdout.strip()[:200]} {out.stderr.strip()[:200]})"
