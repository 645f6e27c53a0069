"""Two-process jobs on 127.0.0.1 for the multi-host tests (gloo CPU collectives): a free coordinator port, each
process's environment, and a pair of processes run to the end."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

TIMEOUT_S = 300
# gloo's C++ library prints "[Gloo] Rank i is connected to n peer ranks. ..." on stdout when CPU collectives
# connect, in two writes that a process's other devices' messages can come between
GLOO_MESSAGE = re.compile(r"\[Gloo\] Rank \d+ is connected to |\d+ peer ranks\. Expected number of connected peer "
                          r"ranks is : \d+\n")


def free_port() -> int:
    """A port no one listens on now: the OS picks it (bind to port 0), so parallel test runs never collide."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(root: Path, devices: int, **extra) -> dict:
    """This environment without JAXFT_* variables, on ``devices`` CPU devices, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAXFT_")}
    # the compilation cache lets later processes reuse earlier ones' executables (time only)
    return {**env, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "JAX_COMPILATION_CACHE_DIR": str(root / "jax-cache"), **extra}


def train_args(config: Path, *extra: str) -> list[str]:
    """The command line of ``jaxft train config extra...`` in this interpreter."""
    return [sys.executable, "-m", "jaxft", "train", str(config), *extra]


def pair_outcomes(root: Path, argv: list[str], devices: int = 1, timeout_s: int = TIMEOUT_S
                  ) -> list[tuple[int, str, str]]:
    """``argv`` as processes 0 and 1 of one job (``devices`` CPU devices each); returns each one's (exit code,
    stdout, stderr). A process still running after ``timeout_s`` is killed and ``subprocess.TimeoutExpired``
    raised: a job that hangs fails its test."""
    port = free_port()
    # output goes to files, not pipes: a process blocked on a full pipe while we wait on the other would hang both
    logs = [tuple(tempfile.TemporaryFile("w+") for _ in range(2)) for _ in range(2)]
    procs = [subprocess.Popen(argv, env=cpu_env(root, devices, JAXFT_COORDINATOR=f"127.0.0.1:{port}",
                                                JAXFT_NUM_PROCESSES="2", JAXFT_PROCESS_ID=str(i)),
                              stdout=logs[i][0], stderr=logs[i][1], text=True) for i in range(2)]
    try:
        for p in procs:
            p.wait(timeout=timeout_s)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    outputs = []
    for out, err in logs:
        for f in (out, err):
            f.seek(0)
        outputs.append((out.read(), err.read()))
        out.close()
        err.close()
    return [(p.returncode, GLOO_MESSAGE.sub("", out), err) for p, (out, err) in zip(procs, outputs)]


def run_pair(root: Path, argv: list[str], devices: int = 1) -> list[tuple[str, str]]:
    """``argv`` as processes 0 and 1 of one job, both of which must succeed; returns each one's (stdout, stderr)."""
    outcomes = pair_outcomes(root, argv, devices)
    for i, (code, out, err) in enumerate(outcomes):
        assert code == 0, f"process {i} exited with {code}:\n{out[-2000:]}\n{err[-4000:]}"
    return [(out, err) for _, out, err in outcomes]
