"""A one-node Slurm cluster on this machine, owned by the test that starts it.

munged with a fresh key, `slurmctld -D` and `slurmd -D` in the foreground, each with its own
socket, ports, spool and state directories under one private root; nothing is read from or
written to /etc/slurm or /etc/munge. Clients find it through SLURM_CONF (`env()`); every process
of the cluster and of its jobs carries that variable, which is how `stop()` finds stragglers.

Slurm's own packages (Debian: slurm-wlm, munge) are installed with apt-get when missing.
"""

from __future__ import annotations

import getpass
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "squeue", "scancel", "srun")
DEBIAN_PACKAGES = ("slurm-wlm", "munge")


class SlurmUnavailable(Exception):
    """Slurm cannot run on this machine at all (the reason says why)."""


def missing_tools() -> list[str]:
    return [tool for tool in (*DAEMONS, *CLIENTS) if shutil.which(tool, path=f"/usr/sbin:/usr/bin:{os.environ['PATH']}") is None]


def ensure_installed() -> None:
    """Install Debian's slurm-wlm and munge when a tool is missing; SlurmUnavailable if we cannot."""
    if not missing_tools():
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SlurmUnavailable(f"{', '.join(missing_tools())} not installed, and installing {' '.join(DEBIAN_PACKAGES)} needs root and apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *DEBIAN_PACKAGES]
    result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:  # stale or absent package lists
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True, timeout=900)
        result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
    if result.returncode != 0 or missing_tools():
        raise SlurmUnavailable(f"apt-get install {' '.join(DEBIAN_PACKAGES)} failed: {result.stdout[-1500:]}{result.stderr[-1500:]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_name() -> str:
    """This machine's short hostname when it resolves (ranks reach rank 0 by the node's name)."""
    name = socket.gethostname().split(".")[0]
    try:
        socket.gethostbyname(name)
    except OSError:
        raise SlurmUnavailable(f"this machine's hostname {name!r} does not resolve: Slurm and the ranks address the node by it")
    return name


def parse_record(line: str) -> dict[str, str]:
    """`scontrol show ... -o` prints one record as space-separated Key=Value pairs."""
    return dict(re.findall(r"(\w+)=(\S*)", line))


class SlurmCluster:
    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        # munged insists that every directory above its socket be searchable by all: pytest's
        # tmp_path (mode 0700) is not, so the cluster lives in its own directory under /tmp.
        self.root = Path(tempfile.mkdtemp(prefix="megajepa-slurm-", dir="/tmp"))
        self.root.chmod(0o755)
        self.conf = self.root / "slurm.conf"
        self.node = node_name()
        self.cpus = os.cpu_count() or 1
        self.daemons: dict[str, subprocess.Popen] = {}

    def env(self, base: Optional[dict] = None) -> dict[str, str]:
        """`base` (default: this process's environment) without any outer job's SLURM_* and
        with SLURM_CONF naming this cluster."""
        env = {k: v for k, v in (os.environ if base is None else base).items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = f"{env.get('PATH', '/usr/bin:/bin')}:/usr/sbin"
        return env

    def _write_config(self) -> None:
        munge = self.root / "munge"
        for sub in ("state", "spool"):
            (self.root / sub).mkdir()
        munge.mkdir(mode=0o755)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        user = getpass.getuser()
        settings = {
            "ClusterName": "megajepa-test",
            "SlurmctldHost": f"{self.node}(127.0.0.1)",
            "SlurmUser": user,
            "SlurmdUser": user,
            "SlurmctldPort": free_port(),
            "SlurmdPort": free_port(),
            "AuthType": "auth/munge",
            "CredType": "cred/munge",
            "AuthInfo": f"socket={munge / 'munge.socket'}",
            "StateSaveLocation": self.root / "state",
            "SlurmdSpoolDir": self.root / "spool",
            "SlurmctldPidFile": self.root / "slurmctld.pid",
            "SlurmdPidFile": self.root / "slurmd.pid",
            "ProctrackType": "proctrack/linuxproc",
            "TaskPlugin": "task/none",
            "SelectType": "select/cons_tres",
            "SelectTypeParameters": "CR_CPU",
            "JobRequeue": 1,
            "MpiDefault": "none",
            "SwitchType": "switch/none",
            "ReturnToService": 2,
            "JobAcctGatherType": "jobacct_gather/none",
            "AccountingStorageType": "accounting_storage/none",
            "JobCompType": "jobcomp/none",
            "MinJobAge": 3600,
            # scancel's SIGKILL follows its SIGTERM after KillWait: long enough that the ranks'
            # checkpoint on SIGTERM never races it, whatever the machine's load
            "KillWait": 300,
        }
        lines = [f"{k}={v}" for k, v in settings.items()]
        lines.append(f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN")
        lines.append(f"PartitionName=test Nodes={self.node} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def _start(self, name: str, argv: list[str]) -> None:
        log = open(self.root / f"{name}.log", "w")
        self.daemons[name] = subprocess.Popen(argv, env=self.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def start(self, timeout: float = 60) -> None:
        self._write_config()
        munge = self.root / "munge"
        self._start("munged", [
            "munged", "--foreground", f"--key-file={munge / 'munge.key'}", f"--socket={munge / 'munge.socket'}",
            f"--pid-file={munge / 'munged.pid'}", f"--seed-file={munge / 'munged.seed'}", f"--log-file={munge / 'munged.log'}",
        ])  # fmt: skip
        self._wait(lambda: (munge / "munge.socket").exists(), timeout, "munged to open its socket")
        self._start("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        self._start("slurmd", ["slurmd", "-D", "-N", self.node, "-f", str(self.conf)])
        self._wait(self._node_idle, timeout, f"node {self.node} to come up idle")

    def _node_idle(self) -> bool:
        result = self.run("sinfo", "--noheader", "--format=%t", check=False)
        return result.returncode == 0 and result.stdout.strip() == "idle"

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            for name, proc in self.daemons.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode} while waiting for {what}:\n{self.logs()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}:\n{self.logs()}")
            time.sleep(0.5)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}:\n{p.read_text()[-3000:]}" for p in sorted(self.root.glob("*.log")))

    def run(self, *argv: str, check: bool = True, env: Optional[dict] = None) -> subprocess.CompletedProcess:
        result = subprocess.run(argv, env=self.env(env), capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr}")
        return result

    def sbatch(self, args: list[str], cwd: Path, env: dict) -> str:
        return self.run_in(cwd, ["sbatch", "--parsable", *args], env).stdout.strip().split(";")[0]

    def run_in(self, cwd: Path, argv: list[str], env: dict) -> subprocess.CompletedProcess:
        result = subprocess.run(argv, cwd=cwd, env=self.env(env), capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr}")
        return result

    def job(self, job_id: str) -> dict[str, str]:
        return parse_record(self.run("scontrol", "show", "job", "-o", job_id).stdout)

    def wait_job(self, job_id: str, done, timeout: float, what: str) -> dict[str, str]:
        """Poll the job's record until done(record); the record."""
        deadline = time.monotonic() + timeout
        while True:
            record = self.job(job_id)
            if done(record):
                return record
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id}: timed out after {timeout:.0f} s waiting for {what}; now {record.get('JobState')}")
            time.sleep(1)

    def stop(self) -> None:
        """Cancel every job, stop the daemons, kill what is left of ours, keep the logs."""
        try:
            if self.daemons.get("slurmctld") and self.daemons["slurmctld"].poll() is None:
                self.run("scancel", "--user", getpass.getuser(), check=False)
                deadline = time.monotonic() + 45
                while time.monotonic() < deadline and self.run("squeue", "--noheader", check=False).stdout.strip():
                    time.sleep(1)
        finally:
            for name in reversed(DAEMONS):
                proc = self.daemons.get(name)
                if proc is not None and proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(timeout=15)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
            for pid in self.stragglers():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.log_dir.mkdir(parents=True, exist_ok=True)
            for log in self.root.glob("*.log"):
                shutil.copy(log, self.log_dir / log.name)
            shutil.rmtree(self.root, ignore_errors=True)

    def stragglers(self) -> list[int]:
        """Processes started by this cluster (slurmstepd, job scripts, ranks): those whose
        environment names this cluster's SLURM_CONF."""
        marker = f"SLURM_CONF={self.conf}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                pass
        return found
