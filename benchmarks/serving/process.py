"""One server in its own process group: started, polled until ``/health`` answers, stopped with its whole group."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Sequence


class ServerStartError(RuntimeError):
    """A launched server exited or did not become healthy in time (its process group has been stopped)."""


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def find_free_port(host: str, start: int, tries: int = 200) -> int:
    for port in range(start, start + tries):
        if port_is_free(host, port):
            return port
    raise RuntimeError(f"no free TCP port in [{start}, {start + tries}) on {host}")


def wait_port_free(host: str, port: int, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if port_is_free(host, port):
            return True
        time.sleep(0.5)
    return False


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``, read from /proc; [pgid] or [] where /proc is absent."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
            return [pgid]
        except (ProcessLookupError, PermissionError):
            return []
    out = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        after_comm = stat[stat.rfind(")") + 2:].split()
        if len(after_comm) > 2 and after_comm[0] != "Z" and int(after_comm[2]) == pgid:
            out.append(int(entry.name))
    return out


def tail(path: str | os.PathLike, lines: int = 40) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class ServerProcess:
    """A server command in its own process group (session), its stdout+stderr in ``log_path``.

    ``start()`` launches, ``wait_healthy()`` polls ``GET {url}/health`` until it answers 200, ``stop()`` sends SIGTERM
    to the whole group, then SIGKILL to what is left after ``grace_s``, and waits until no process of the group runs.
    As a context manager the group is stopped however the block ends.
    """

    def __init__(self, cmd: Sequence[str], url: str, log_path: str | os.PathLike, *, env: dict | None = None):
        self.cmd = list(cmd)
        self.url = url.rstrip("/")
        self.log_path = Path(log_path)
        self.env = dict(env or {})
        self.proc: subprocess.Popen | None = None

    def start(self) -> "ServerProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        with open(self.log_path, "w") as log:
            log.write("$ " + shlex.join(self.cmd) + "\n")
            log.flush()
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, start_new_session=True)
        return self

    def wait_healthy(self, timeout_s: float, *, poll_s: float = 0.25, log: Callable[[str], None] = print) -> float:
        """Seconds until ``/health`` answered 200. On exit or timeout: stop the group, raise ServerStartError."""
        assert self.proc is not None, "start() first"
        t0 = time.monotonic()
        next_note = t0 + 30
        while True:
            rc = self.proc.poll()
            if rc is not None:
                self.stop()
                raise ServerStartError(f"server exited with code {rc} before becoming healthy; log {self.log_path}, "
                                       f"last lines:\n{tail(self.log_path)}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as resp:
                    if resp.status == 200:
                        return time.monotonic() - t0
            except (urllib.error.URLError, OSError):
                pass
            now = time.monotonic()
            if now - t0 > timeout_s:
                self.stop()
                raise ServerStartError(f"server not healthy after {timeout_s:.0f} s ({self.url}/health); stopped it. "
                                       f"Log {self.log_path}, last lines:\n{tail(self.log_path)}")
            if now >= next_note:
                log(f"  ... waiting for {self.url} ({now - t0:.0f} s)")
                next_note = now + 30
            time.sleep(poll_s)

    def stop(self, grace_s: float = 30.0) -> None:
        """Stop every process of the group (idempotent)."""
        if self.proc is None:
            return
        pgid = self.proc.pid
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 15.0)):
            try:
                os.killpg(pgid, sig)
            except (ProcessLookupError, PermissionError):
                pass
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                self.proc.poll()
                if self.proc.returncode is not None and not group_members(pgid):
                    return
                time.sleep(0.2)
        self.proc.poll()

    def __enter__(self) -> "ServerProcess":
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def install_sigterm_exit() -> None:
    """Turn SIGTERM (e.g. from ``timeout``) into SystemExit so ``finally`` blocks stop the launched servers."""
    def _exit(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)
