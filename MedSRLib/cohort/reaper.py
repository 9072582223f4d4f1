"""Ends a local Ray runtime's processes when the process that started it dies without
shutting it down (SIGKILL, the kernel's out-of-memory killer).

Ray ties its own servers (gcs_server, raylet) to the starting thread with PR_SET_PDEATHSIG,
but the helpers the raylet starts (dashboard and runtime-env agents, idle workers) outlive
it. `start_reaper` starts a small watcher process, in its own session (a terminal's Ctrl-C
does not reach it), that notes the Ray processes descended from the starting process while
that process lives; when the pipe from it closes (it died, or `Reaper.stop` after
`ray.shutdown()`), the watcher ends every noted process still running (SIGTERM, then SIGKILL
after 3 s) and exits. Each process is recognised by its pid and start time, so a reused pid
is never hit. Needs psutil (a dependency of Ray); without it there is no reaper.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from pathlib import Path

#: Seconds between two looks at the starting process's descendants.
POLL_SECONDS = 0.2
#: Seconds a noted process gets between SIGTERM and SIGKILL.
GRACE_SECONDS = 3.0


class Reaper:
    """The watcher process of one local Ray runtime."""

    def __init__(self, process: subprocess.Popen):
        self.process = process

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, timeout: float = 10.0) -> None:
        """Close the pipe: the watcher ends what is left of the runtime and exits."""
        try:
            if self.process.stdin is not None:
                self.process.stdin.close()
        except OSError:
            pass
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_reaper() -> Reaper | None:
    """Start the watcher for this process's Ray runtime (call before `ray.init`); None when
    psutil is missing or the watcher cannot start."""
    try:
        import psutil  # noqa: F401 - the watcher needs it
    except ImportError:
        return None
    package_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "MedSRLib.cohort.reaper", str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, close_fds=True, env=env)
    except OSError:
        return None
    return Reaper(process)


def _is_ray_process(process) -> bool:
    import psutil

    try:
        text = " ".join([process.name(), *process.cmdline()]).lower()
    except psutil.Error:
        return False
    return "ray" in text


def watch(driver_pid: int) -> None:
    """Note `driver_pid`'s Ray descendants until stdin closes, then end those still running."""
    import psutil

    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)  # the cleaner must finish
    noted: dict[int, psutil.Process] = {}
    try:
        driver = psutil.Process(driver_pid)
    except psutil.Error:
        return
    me = os.getpid()
    while True:
        ready, _, _ = select.select([sys.stdin.fileno()], [], [], POLL_SECONDS)
        if ready and not os.read(sys.stdin.fileno(), 4096):
            break  # the driver closed the pipe or died
        try:
            children = driver.children(recursive=True)
        except psutil.Error:
            break
        for child in children:
            if child.pid != me and child.pid not in noted and _is_ray_process(child):
                noted[child.pid] = child
    running = [p for p in noted.values() if p.is_running()]  # pid and start time both match
    for process in running:
        try:
            process.terminate()
        except psutil.Error:
            pass
    _, still_running = psutil.wait_procs(running, timeout=GRACE_SECONDS)
    for process in still_running:
        try:
            process.kill()
        except psutil.Error:
            pass


if __name__ == "__main__":
    watch(int(sys.argv[1]))
