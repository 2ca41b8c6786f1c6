"""A private single-node SLURM cluster for tests, from the OS packages (slurmctld, slurmd, munge).

Debian: ``apt-get install slurmctld slurmd slurm-client munge`` (about 25 s). Everything lives
in a temporary folder: its own munge socket, its own ``slurm.conf`` (pointed to by
``SLURM_CONF``), free ports, daemons in the foreground as child processes that :meth:`close`
ends. Needs root (the daemons run as root there) and the munge key of the package.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo")
MUNGE_KEY = Path("/etc/munge/munge.key")


def missing() -> str | None:
    """Why a private SLURM cannot start here (None when it can)."""
    absent = [d for d in DAEMONS if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]
    if absent:
        return f"SLURM is not installed ({', '.join(absent)} missing: apt-get install slurmctld slurmd slurm-client munge)"
    if os.geteuid() != 0:
        return "a private SLURM needs root"
    if not MUNGE_KEY.is_file():
        return f"no munge key at {MUNGE_KEY}"
    return None


def _which(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class PrivateSlurm:
    """munged + slurmctld + slurmd on this host, one partition ``debug`` of this host's CPUs."""

    def __init__(self, root: Path, *, timeout: float = 60) -> None:
        self.root = Path(root)
        for sub in ("state", "spool", "log", "run", "munge"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        host = socket.gethostname()
        ctld_port, d_port = _free_ports(2)
        self.munge_socket = self.root / "munge" / "munge.socket"
        cpus = os.cpu_count() or 1
        self.conf = self.root / "slurm.conf"
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=wsihipetest",
                    f"SlurmctldHost={host}",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    "AuthType=auth/munge",
                    f"AuthInfo=socket={self.munge_socket}",
                    f"StateSaveLocation={self.root / 'state'}",
                    f"SlurmdSpoolDir={self.root / 'spool'}",
                    f"SlurmctldPidFile={self.root / 'run' / 'slurmctld.pid'}",
                    f"SlurmdPidFile={self.root / 'run' / 'slurmd.pid'}",
                    f"SlurmctldLogFile={self.root / 'log' / 'slurmctld.log'}",
                    f"SlurmdLogFile={self.root / 'log' / 'slurmd.log'}",
                    f"SlurmctldPort={ctld_port}",
                    f"SlurmdPort={d_port}",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core",
                    "ReturnToService=2",
                    "MpiDefault=none",
                    "JobAcctGatherType=jobacct_gather/none",
                    "AccountingStorageType=accounting_storage/none",
                    f"NodeName={host} CPUs={cpus} RealMemory=4000 State=UNKNOWN",
                    f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        m = self.root / "munge"
        self.procs = [
            self._start(
                _which("munged"),
                "--foreground",
                "--force",
                f"--socket={self.munge_socket}",
                f"--key-file={MUNGE_KEY}",
                f"--pid-file={m / 'munged.pid'}",
                f"--seed-file={m / 'munged.seed'}",
                f"--log-file={m / 'munged.log'}",
            )
        ]
        self._wait(lambda: self.munge_socket.exists(), timeout, "munged")
        self.procs.append(self._start(_which("slurmctld"), "-D", "-f", str(self.conf)))
        self.procs.append(self._start(_which("slurmd"), "-D", "-f", str(self.conf)))
        self._wait(self._node_ready, timeout, "slurmd")

    def _start(self, *cmd: str) -> subprocess.Popen:
        return subprocess.Popen(
            list(cmd), env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def _node_ready(self) -> bool:
        out = subprocess.run(
            [_which("sinfo"), "-h", "-o", "%t"], env=self.env, capture_output=True, text=True
        )
        return out.returncode == 0 and out.stdout.strip() in ("idle", "mix", "alloc")

    def _wait(self, ready, timeout: float, what: str) -> None:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if ready():
                return
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.2)
        self.close()
        logs = "; ".join(str(p) for p in (self.root / "log").glob("*.log"))
        raise RuntimeError(f"private SLURM: {what} did not come up (logs: {logs})")

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=30)
