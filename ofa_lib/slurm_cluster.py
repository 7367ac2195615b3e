"""A real one-node SLURM cluster on 127.0.0.1, for tests and CI.

Everything the cluster writes (munge key/socket, ``slurm.conf``, controller state, slurmd spool,
pid and log files) lives under one directory; client commands (``sbatch``, ``squeue``,
``scontrol``, ``scancel``, ``sinfo``) reach it through ``SLURM_CONF`` in :attr:`Cluster.env`.
Only the daemons started here are ever stopped (by pid, checked against their command line).

    python -m ofa_lib.slurm_cluster install            # apt-get install the Debian packages (root)
    python -m ofa_lib.slurm_cluster start  --dir DIR   # prints: export SLURM_CONF=DIR/slurm.conf
    python -m ofa_lib.slurm_cluster status --dir DIR
    python -m ofa_lib.slurm_cluster stop   --dir DIR

``sacct`` needs ``slurmdbd`` (a database) and does not work here: finished jobs stay visible to
``scontrol show job`` / ``squeue --states=all`` for ``MinJobAge`` seconds, and every finished job
is appended to ``DIR/log/jobcomp.txt`` (``JobCompType=jobcomp/filetxt``), see :func:`job_states`.
Only the standard library is used, so this module runs before the project's venv exists.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

DAEMONS = ("slurmctld", "slurmd", "munged")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo")
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
SYSTEM_MUNGE_KEY = Path("/etc/munge/munge.key")
STATE_FILE = "cluster.json"
# AF_UNIX socket paths are limited to 107 bytes; slurmstepd puts "<node>_<job>.<step>" sockets
# into the spool directory, so keep the run directory (munge socket + spool) well below that.
_MAX_RUN_DIR = 64
REQUIRE_ENV = "OFA_REQUIRE_SLURM"
_OUTER_VARS = ("SLURM_", "SBATCH_", "SQUEUE_", "SALLOC_", "SRUN_", "SINFO_", "SCANCEL_")
_CHILDREN: dict[int, subprocess.Popen] = {}  # daemons started by this process, by pid
# squeue states after which a job no longer changes
TERMINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                      "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT", "REVOKED"})


class SlurmClusterError(RuntimeError):
    """The local SLURM cluster could not be installed, started or stopped."""


@dataclass
class Cluster:
    """A running local cluster: pass ``env`` to every SLURM client command."""

    dir: str
    conf: str
    env: dict[str, str]
    node: str
    cpus: int
    real_memory_mb: int
    partition: str
    pids: dict[str, int]
    logs: dict[str, str]
    ports: dict[str, int]
    run_dir: str
    started_s: float = 0.0

    def client_env(self) -> dict[str, str]:
        """``os.environ`` without outer SLURM_*/SBATCH_* variables, plus ``SLURM_CONF`` of this cluster."""
        return _clean_env(Path(self.conf))

    def run(self, *args: str, check: bool = True, timeout: float = 30,
            cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
        """Run a SLURM client command (``cluster.run("squeue", "-h")``) against this cluster."""
        try:
            return subprocess.run(list(args), env=self.client_env(), capture_output=True, text=True, check=check,
                                  timeout=timeout, cwd=cwd)
        except subprocess.CalledProcessError as e:
            raise SlurmClusterError(f"`{' '.join(args)}` failed (exit {e.returncode}): {e.stderr.strip()}") from e


# ---------------------------------------------------------------------------------------------
# availability and installation


def missing_binaries() -> list[str]:
    """The daemons / client commands not found on PATH (``/usr/sbin`` included)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return [b for b in (*DAEMONS, *CLIENTS) if shutil.which(b, path=path) is None]


def _which(name: str) -> str:
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    found = shutil.which(name, path=path)
    if found is None:
        raise SlurmClusterError(f"{name} not found on PATH (install: {' '.join(PACKAGES)})")
    return found


def available() -> tuple[bool, str]:
    """Whether a local cluster can be started here; else ``(False, reason)`` for ``pytest.skip``."""
    if not sys.platform.startswith("linux"):
        return False, f"local SLURM cluster needs Linux, this is {sys.platform}"
    if os.geteuid() != 0:
        return False, "local SLURM cluster needs root (slurmd runs jobs as SlurmUser=root)"
    missing = missing_binaries()
    if missing:
        return False, (f"SLURM/munge binaries missing: {', '.join(missing)} "
                       f"(run `python -m ofa_lib.slurm_cluster install` or apt-get install {' '.join(PACKAGES)})")
    return True, "ok"


def ensure_installed(timeout_s: float = 300) -> None:
    """``apt-get install`` the Debian SLURM/munge packages when any binary is missing (root only).

    Every apt call has a timeout, so a machine without network fails with a clear error instead of
    hanging.
    """
    missing = missing_binaries()
    if not missing:
        return
    if os.geteuid() != 0:
        raise SlurmClusterError(f"SLURM binaries missing ({', '.join(missing)}) and not root: cannot apt-get install")
    if shutil.which("apt-get") is None:
        raise SlurmClusterError(f"SLURM binaries missing ({', '.join(missing)}) and apt-get not available")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    deadline = time.monotonic() + timeout_s
    apt_opts = ["-o", "Acquire::Retries=1", "-o", "Acquire::http::Timeout=20", "-o", "Acquire::https::Timeout=20"]

    def apt(*args: str) -> subprocess.CompletedProcess:
        left = deadline - time.monotonic()
        if left <= 0:
            raise SlurmClusterError(f"apt-get did not finish within {timeout_s:.0f} s")
        try:
            return subprocess.run(["apt-get", *apt_opts, *args], env=env, capture_output=True, text=True,
                                  timeout=left)
        except subprocess.TimeoutExpired as e:
            raise SlurmClusterError(f"apt-get {' '.join(args)} timed out after {timeout_s:.0f} s (no network?)") from e

    res = apt("install", "-y", "--no-install-recommends", *PACKAGES)
    if res.returncode != 0:  # stale package lists: refresh once and retry
        apt("update")
        res = apt("install", "-y", "--no-install-recommends", *PACKAGES)
    if res.returncode != 0:
        raise SlurmClusterError(f"apt-get install {' '.join(PACKAGES)} failed:\n{res.stderr[-2000:]}")
    still = missing_binaries()
    if still:
        raise SlurmClusterError(f"after apt-get install, still missing: {', '.join(still)}")


# ---------------------------------------------------------------------------------------------
# configuration


def _free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 right now (the OS picks them)."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def node_hardware() -> dict[str, int]:
    """CPUs, sockets/cores/threads and RealMemory (MB) as ``slurmd -C`` reports them."""
    out = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, timeout=30, check=True).stdout
    fields = dict(tok.split("=", 1) for tok in out.split("\n", 1)[0].split() if "=" in tok)
    keys = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore", "RealMemory")
    try:
        return {k: int(fields[k]) for k in keys}
    except (KeyError, ValueError) as e:
        raise SlurmClusterError(f"cannot parse `slurmd -C` output: {out!r}") from e


def _run_dir(root: Path) -> Path:
    """Directory for the munge socket and the slurmd spool (short enough for AF_UNIX paths)."""
    run = root / "run"
    if run.is_symlink() or run.is_dir():
        return run.resolve()
    if len(str(run)) <= _MAX_RUN_DIR:
        run.mkdir(mode=0o755)
        return run
    short = Path(tempfile.mkdtemp(prefix="ofa-slurm-"))
    run.symlink_to(short, target_is_directory=True)
    return short


def write_config(root: Path, run: Path, node: str, hw: dict[str, int], ports: Sequence[int],
                 partition: str = "debug") -> Path:
    """Write ``slurm.conf`` (and an empty plugstack.conf) under ``root``; return the slurm.conf path."""
    log, state, spool = root / "log", root / "state", run / "spool"
    for d in (log, state, spool):
        d.mkdir(parents=True, exist_ok=True)
    plugstack = root / "plugstack.conf"
    plugstack.write_text("")
    hw_line = " ".join(f"{k}={v}" for k, v in hw.items())
    conf = f"""\
# Generated by ofa_lib.slurm_cluster: a one-node test cluster, every file under {root}
ClusterName=ofa-local
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ports[0]}
SlurmdPort={ports[1]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={run / "munge.sock"}
StateSaveLocation={state}
SlurmdSpoolDir={spool}
SlurmctldPidFile={root / "slurmctld.pid"}
SlurmdPidFile={root / "slurmd.pid"}
SlurmctldLogFile={log / "slurmctld.log"}
SlurmdLogFile={log / "slurmd.log"}
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig={plugstack}
MpiDefault=none
SwitchType=switch/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={log / "jobcomp.txt"}
ReturnToService=2
MaxArraySize=10001
MaxJobCount=100000
MinJobAge=86400
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=1,sched_min_interval=100000
EnforcePartLimits=ALL
MailProg=/bin/true
# SLURM's default: the seconds from SIGTERM to SIGKILL, in which a requeued or preempted training run
# finishes its step and writes its resume state (5 s was too short for that on a loaded 2-core machine)
KillWait=30
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName={node} NodeAddr=127.0.0.1 NodeHostname={node} {hw_line} State=UNKNOWN
PartitionName={partition} Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""
    path = root / "slurm.conf"
    path.write_text(conf)
    return path


# ---------------------------------------------------------------------------------------------
# daemons


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _alive(pid: int, marker: str) -> bool:
    """Whether ``pid`` is running and its command line contains ``marker`` (our conf / socket).

    Daemons started by this process are asked through their Popen handle: right after ``exec``
    the kernel may still show an empty command line.
    """
    child = _CHILDREN.get(pid)
    if child is not None:
        return child.poll() is None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":  # zombie: already exited
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
        return False
    return any(marker in a for a in _cmdline(pid))


def _tail(path: str | Path, n: int = 25) -> str:
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return f"({path}: not written)"
    return "\n".join(lines[-n:])


def _wait_for(check, timeout_s: float, what: str, logs: dict[str, str], poll_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- tail of {logs[d]} ---\n{_tail(logs[d])}" for d in DAEMONS if d in logs)
            raise SlurmClusterError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{tails}")
        time.sleep(poll_s)


def _clean_env(conf: Path) -> dict[str, str]:
    """Our environment minus variables of an outer SLURM job / user defaults, plus ``SLURM_CONF``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_OUTER_VARS)}
    env["SLURM_CONF"] = str(conf)
    return env


def _spawn(argv: list[str], log: Path, env: dict[str, str]) -> int:
    """Start a daemon in the foreground (``-D``/``-F``), detached in its own session; return its pid."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, close_fds=True)
    _CHILDREN[proc.pid] = proc
    return proc.pid


def _start_munge(run: Path, log_dir: Path, env: dict[str, str]) -> tuple[int, Path]:
    key = SYSTEM_MUNGE_KEY
    if not (key.is_file() and os.access(key, os.R_OK)):
        key = run / "munge.key"
        if not key.exists():  # what `mungekey` does: 1024 random bits, readable by the daemon only
            fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(os.urandom(128))
    sock = run / "munge.sock"
    # --force: munged refuses sockets below a directory not searchable by everyone (pytest's tmp
    # dirs are 0700); in the foreground it logs to stderr, i.e. to log/munged.log
    argv = [_which("munged"), "--foreground", "--force", f"--socket={sock}", f"--key-file={key}",
            f"--pid-file={run / 'munged.pid'}", f"--seed-file={run / 'munged.seed'}", "--num-threads=2"]
    pid = _spawn(argv, log_dir / "munged.log", env)
    return pid, sock


def _sinfo_state(conf: Path, node: str) -> str:
    try:
        res = subprocess.run(["sinfo", "-h", "-N", "-n", node, "-o", "%T"], env=_clean_env(conf),
                             capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return ""
    return res.stdout.strip() if res.returncode == 0 else ""


def start(dir: str | os.PathLike, timeout_s: float = 60, partition: str = "debug") -> Cluster:
    """Start munged, slurmctld and slurmd with every file under ``dir``; wait until the node is idle."""
    ok, reason = available()
    if not ok:
        raise SlurmClusterError(reason)
    t0 = time.monotonic()
    root = Path(dir).absolute()
    root.mkdir(parents=True, exist_ok=True)
    existing = _load(root)
    if existing is not None and any(_alive(p, _marker(existing, n)) for n, p in existing.pids.items()):
        raise SlurmClusterError(f"a cluster is already running from {root} (pids {existing.pids}); stop it first")
    run = _run_dir(root)
    log_dir = root / "log"
    log_dir.mkdir(exist_ok=True)
    node = socket.gethostname().split(".")[0]
    hw = node_hardware()
    ports = _free_ports(2)
    conf = write_config(root, run, node, hw, ports, partition)
    env = _clean_env(conf)
    logs = {"munged": str(log_dir / "munged.log"), "slurmctld": str(log_dir / "slurmctld.log"),
            "slurmd": str(log_dir / "slurmd.log"), "jobcomp": str(log_dir / "jobcomp.txt")}
    cluster = Cluster(dir=str(root), conf=str(conf), env={"SLURM_CONF": str(conf)}, node=node, cpus=hw["CPUs"],
                      real_memory_mb=hw["RealMemory"], partition=partition, pids={}, logs=logs,
                      ports={"slurmctld": ports[0], "slurmd": ports[1]}, run_dir=str(run))
    try:
        pid, sock = _start_munge(run, log_dir, env)
        cluster.pids["munged"] = pid
        _save(cluster)
        _wait_for(lambda: sock.exists() or not _alive(pid, str(sock)), timeout_s, "munged socket", logs)
        if not _alive(pid, str(sock)):
            raise SlurmClusterError(f"munged exited at start:\n{_tail(logs['munged'])}")
        cluster.pids["slurmctld"] = _spawn([_which("slurmctld"), "-D", "-f", str(conf)], log_dir / "slurmctld.out", env)
        _save(cluster)
        cluster.pids["slurmd"] = _spawn([_which("slurmd"), "-D", "-f", str(conf), "-N", node], log_dir / "slurmd.out",
                                        env)
        _save(cluster)

        def idle() -> bool:
            for name in ("slurmctld", "slurmd"):
                if not _alive(cluster.pids[name], str(conf)):
                    out = log_dir / f"{name}.out"
                    raise SlurmClusterError(f"{name} exited at start:\n{_tail(out)}\n{_tail(logs[name])}")
            return _sinfo_state(conf, node).rstrip("*") == "idle"

        _wait_for(idle, timeout_s, f"node {node} to be idle in `sinfo`", logs)
    except BaseException:
        stop(cluster)
        raise
    cluster.started_s = round(time.monotonic() - t0, 3)
    _save(cluster)
    return cluster


def _marker(cluster: Cluster, name: str) -> str:
    return str(Path(cluster.run_dir) / "munge.sock") if name == "munged" else cluster.conf


def _save(cluster: Cluster) -> None:
    path = Path(cluster.dir) / STATE_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(asdict(cluster), indent=2))
    os.replace(tmp, path)


def _load(root: Path) -> Cluster | None:
    path = root / STATE_FILE
    if not path.is_file():
        return None
    return Cluster(**json.loads(path.read_text()))


def _env_of(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(kv.split("=", 1) for kv in raw.decode(errors="replace").split("\0") if "=" in kv)


def _strays(conf: str) -> list[int]:
    """slurmstepd / job processes of this cluster still alive (their environment names our conf)."""
    me = {os.getpid(), os.getppid()}
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) in me:
            continue
        env = _env_of(int(p.name))
        if env.get("SLURM_CONF") != conf:
            continue
        try:
            comm = (p / "comm").read_text().strip()
        except OSError:
            continue
        if comm == "slurmstepd" or "SLURM_JOB_ID" in env:
            found.append(int(p.name))
    return found


def _terminate(pids: dict[str, int], markers: dict[str, str], timeout_s: float) -> None:
    for name, pid in pids.items():
        if _alive(pid, markers[name]):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(_alive(p, markers[n]) for n, p in pids.items()):
        time.sleep(0.1)
    for name, pid in pids.items():
        if _alive(pid, markers[name]):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    for pid in pids.values():  # reap our own children (no zombies)
        child = _CHILDREN.pop(pid, None)
        if child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=5)


def stop(cluster: Cluster | str | os.PathLike, timeout_s: float = 20) -> None:
    """Cancel the cluster's jobs, stop the daemons it started, remove its short run directory.

    Idempotent: stopping a stopped cluster (or a directory without one) does nothing.
    """
    if not isinstance(cluster, Cluster):
        loaded = _load(Path(cluster).absolute())
        if loaded is None:
            return
        cluster = loaded
    markers = {n: _marker(cluster, n) for n in cluster.pids}
    if all(_alive(cluster.pids.get(n, -1), markers.get(n, "")) for n in ("slurmctld", "munged")):
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            cluster.run("scancel", "--full", "--quiet", "--user", "root", check=False, timeout=10)
            deadline = time.monotonic() + timeout_s / 2
            while time.monotonic() < deadline and cluster.run("squeue", "-h", check=False, timeout=10).stdout.strip():
                time.sleep(0.2)
    order = ["slurmd", "slurmctld", "munged"]  # munged last: the others talk to it while stopping
    for name in order:
        if name in cluster.pids:
            _terminate({name: cluster.pids[name]}, markers, timeout_s / 3)
    for pid in _strays(cluster.conf):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    run = Path(cluster.dir) / "run"
    if run.is_symlink():
        target = run.resolve()
        run.unlink()
        shutil.rmtree(target, ignore_errors=True)


def status(dir: str | os.PathLike) -> dict[str, object]:
    """Which of the daemons started from ``dir`` are alive, and the node state in ``sinfo``."""
    c = _load(Path(dir).absolute())
    if c is None:
        return {"dir": str(dir), "cluster": None}
    alive = {n: _alive(p, _marker(c, n)) for n, p in c.pids.items()}
    node_state = _sinfo_state(Path(c.conf), c.node) if alive.get("slurmctld") and alive.get("munged") else ""
    return {"dir": c.dir, "conf": c.conf, "node": c.node, "cpus": c.cpus, "alive": alive, "pids": c.pids,
            "node_state": node_state or None}


@contextlib.contextmanager
def cluster(dir: str | os.PathLike, timeout_s: float = 60) -> Iterator[Cluster]:
    """``with cluster(tmp) as c: c.run("sbatch", ...)``; the daemons are stopped on exit."""
    c = start(dir, timeout_s=timeout_s)
    try:
        yield c
    finally:
        stop(c)


def skip_unless_available() -> None:
    """In a test: ``pytest.skip`` with the reason where SLURM cannot run here.

    With ``OFA_REQUIRE_SLURM=1`` (set by CI) the test fails instead, so CI cannot skip it silently.
    """
    import pytest

    ok, reason = available()
    if not ok:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but no local SLURM cluster: {reason}")
        pytest.skip(f"no local SLURM cluster: {reason}")


def pytest_cluster(dir: str | os.PathLike) -> Iterator[Cluster]:
    """Body of a pytest fixture: a running cluster, or a skip with the reason (see skip_unless_available).

        @pytest.fixture
        def slurm(tmp_path):
            yield from slurm_cluster.pytest_cluster(tmp_path / "slurm")
    """
    skip_unless_available()
    with cluster(dir) as c:
        yield c


# ---------------------------------------------------------------------------------------------
# jobs


def job_states(cluster: Cluster, job_id: str | int) -> dict[str, str]:
    """State of every task of a job (``"123_0" -> "COMPLETED"``), from ``squeue --states=all``.

    Finished jobs stay listed for ``MinJobAge`` (a day here); ``sacct`` would need slurmdbd.
    """
    out = cluster.run("squeue", "-h", "--states=all", "-r", "-j", str(job_id), "-o", "%i %T", check=False).stdout
    return dict(line.split(None, 1) for line in out.splitlines() if line.strip())


def wait_jobs(cluster: Cluster, job_id: str | int, timeout_s: float = 60, poll_s: float = 0.25) -> dict[str, str]:
    """Poll ``squeue`` until every task of ``job_id`` reached a final state; return the states."""
    deadline = time.monotonic() + timeout_s
    while True:
        states = job_states(cluster, job_id)
        if states and all(s in TERMINAL for s in states.values()):
            return states
        if time.monotonic() > deadline:
            raise SlurmClusterError(f"job {job_id} not finished after {timeout_s:.0f} s: {states}\n"
                                    f"--- tail of {cluster.logs['slurmctld']} ---\n{_tail(cluster.logs['slurmctld'])}")
        time.sleep(poll_s)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ofa_lib.slurm_cluster", description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["install", "start", "stop", "status", "available"])
    ap.add_argument("--dir", help="directory holding the cluster's config, state, logs (start/stop/status)")
    ap.add_argument("--timeout", type=float, default=60, help="seconds to wait for the node to be idle")
    args = ap.parse_args(argv)
    try:
        if args.command == "install":
            ensure_installed()
            print(f"slurm and munge are installed ({', '.join(PACKAGES)})")
            return 0
        if args.command == "available":
            ok, reason = available()
            print(reason)
            return 0 if ok else 1
        if not args.dir:
            ap.error(f"{args.command} needs --dir DIR")
        if args.command == "start":
            c = start(args.dir, timeout_s=args.timeout)
            print(f"# cluster up in {c.started_s:.1f} s: node {c.node} ({c.cpus} CPUs), partition {c.partition}")
            print(f"export SLURM_CONF={c.conf}")
        elif args.command == "stop":
            stop(args.dir)
            print(f"stopped the cluster in {args.dir}")
        else:
            print(json.dumps(status(args.dir), indent=2))
    except SlurmClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
