"""A real one-node Slurm for the tests: munged, slurmctld and slurmd started from Debian's
`slurm-wlm` and `munge` packages, with every file (key, slurm.conf, spool, state, logs) in one
temporary directory, and stopped again by pid.

`python tests/slurm_cluster.py` starts one, prints the SLURM_CONF to export, and stops it at
Ctrl-C (for trying the job scripts by hand).

The packages are installed with apt-get when they are missing and this process is root; otherwise
`unavailable()` says why in one line and the tests skip (unless AT_REQUIRE_SLURM=1, as in CI,
where that is a failure).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
PACKAGES = ("munge", "slurmctld", "slurmd", "slurm-client")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo")
# Seconds a requeued job waits before it is eligible again: Slurm takes it from the munge
# credential lifetime (AuthInfo cred_expire, 120 s unless set), which also bounds how long a
# job step may take to launch; a few seconds are plenty on one local node.
REQUEUE_DELAY = 10


def _binary(name: str) -> str | None:
    return shutil.which(name) or next((str(Path(d, name)) for d in ("/usr/sbin", "/sbin")
                                       if Path(d, name).is_file()), None)


def _missing() -> list[str]:
    return [n for n in (*DAEMONS, *CLIENTS) if _binary(n) is None]


def install() -> str | None:
    """Install the packages when missing (root only). Returns why Slurm cannot run, or None."""
    if not _missing():
        return None
    if os.geteuid() != 0:
        return f"Slurm is not installed ({', '.join(_missing())} missing) and installing it " \
               f"needs root"
    if shutil.which("apt-get") is None:
        return "Slurm is not installed and there is no apt-get to install it with"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:  # a fresh machine has no package lists yet
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or _missing():
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return f"apt-get could not install {' '.join(PACKAGES)}: {tail}"
    return None


def unavailable() -> str | None:
    """Why a local Slurm cannot be started here (one line), or None."""
    if sys.platform != "linux":
        return "a local Slurm needs Linux"
    return install()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """One node named after this host, one partition `test`, JobRequeue=1, no accounting."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root or tempfile.mkdtemp(prefix="slurm-"))
        self.node = socket.gethostname().split(".")[0]
        # At least 2 CPUs so that two array tasks of one CPU each run side by side
        # (config_overrides lets slurmd accept a count above the hardware's).
        self.cpus = max(2, os.cpu_count() or 1)
        self.conf = self.root / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}

    @property
    def env(self) -> dict[str, str]:
        """The environment for the Slurm commands (sbatch, squeue, ...)."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def _write_config(self) -> None:
        r = self.root
        for d in ("state", "spool", "munge"):
            (r / d).mkdir(mode=0o700, exist_ok=True)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        socket_path = r / "munge" / "munge.socket"
        lines = [
            "ClusterName=attest",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge",
            f"AuthInfo=socket={socket_path},cred_expire={REQUEUE_DELAY}",
            f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}", f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'slurmctld.log'}", f"SlurmdLogFile={r / 'slurmd.log'}",
            "SlurmctldDebug=info", "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
            "JobRequeue=1", "ReturnToService=2", "MpiDefault=none",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none", "JobCompType=jobcomp/none",
            # The scheduler also runs on every submit and job end; its periodic pass (60 s by
            # default) is what starts a requeued job once its delay is over.
            "SchedulerParameters=sched_interval=2",
            "SlurmdParameters=config_overrides",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN",
            "PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def _spawn(self, name: str, *args: str) -> None:
        log = open(self.root / f"{name}.stdout", "wb")
        self.procs[name] = subprocess.Popen([_binary(name), *args], stdout=log,
                                            stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)

    def start(self, timeout: float = 60) -> "Cluster":
        self._write_config()
        m = self.root / "munge"
        self._spawn("munged", "--foreground", "--force", f"--key-file={m / 'munge.key'}",
                    f"--socket={m / 'munge.socket'}", f"--pid-file={m / 'munged.pid'}",
                    f"--log-file={m / 'munged.log'}", f"--seed-file={m / 'munged.seed'}")
        self._wait(lambda: (m / "munge.socket").exists(), timeout, "munged")
        self._spawn("slurmctld", "-D", "-c", "-f", str(self.conf))
        self._spawn("slurmd", "-D", "-f", str(self.conf), "-N", self.node)
        self._wait(lambda: self.sinfo() == "idle", timeout, "the node to be idle in sinfo")
        return self

    def sinfo(self) -> str:
        proc = subprocess.run([_binary("sinfo"), "-h", "-N", "-o", "%t"], env=self.env,
                              capture_output=True, text=True)
        return proc.stdout.strip()

    def _wait(self, ready, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while not ready():
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead or time.monotonic() > end:
                self.stop()
                why = f"{dead[0]} exited" if dead else f"no {what} after {timeout:.0f} s"
                raise RuntimeError(f"local Slurm did not start: {why}; logs in {self.root}:\n"
                                   + self.logs())
            time.sleep(0.2)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(self.root.glob("*.log")) + sorted(
                             self.root.glob("*.stdout")) + sorted(self.root.glob("munge/*.log")))

    def stop(self) -> None:
        """Cancel this cluster's jobs, then stop the daemons this object started (by pid),
        slurmd first."""
        if self.procs.get("slurmctld") is not None and self.procs["slurmctld"].poll() is None:
            jobs = subprocess.run([_binary("squeue"), "-h", "-o", "%A"], env=self.env,
                                  capture_output=True, text=True).stdout.split()
            if jobs:
                subprocess.run([_binary("scancel"), *jobs], env=self.env, capture_output=True)
                end = time.monotonic() + 30
                while time.monotonic() < end and subprocess.run(
                        [_binary("squeue"), "-h"], env=self.env, capture_output=True,
                        text=True).stdout.strip():
                    time.sleep(0.5)
        for name in reversed(DAEMONS):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


if __name__ == "__main__":
    reason = unavailable()
    if reason:
        sys.exit(f"slurm_cluster: {reason}")
    cluster = Cluster().start()
    print(f"export SLURM_CONF={cluster.conf}", flush=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops it as Ctrl-C does
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        cluster.stop()
