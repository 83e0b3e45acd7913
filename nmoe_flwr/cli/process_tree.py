"""Stopping a whole process tree, exactly: :func:`stop_tree` returns only once every
member has exited.

Flower's SuperLink starts ``flower-superexec`` in its own session and Ray
under it, and Ray's processes may outlive their parents or start late, so
signalling a process group, or a list of descendants taken once, is not
enough: :func:`stop_tree` re-collects the tree by parent, session, process
group and an inherited environment marker (:func:`tree_marker`) until it is
gone, SIGKILLs what ignores SIGTERM, and says so. Linux ``/proc`` only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path

#: Environment variable whose value marks every process of one tree started here
#: (see :func:`tree_marker`); inherited by Flower's SuperExec, ServerApp and Ray workers.
TREE_MARKER_VAR = "NMOE_PROCESS_TREE"

_EXITED = frozenset("ZX")  # zombie / dead: exited, only waiting to be reaped


class ProcessTreeError(RuntimeError):
    """Processes of a tree were still running after SIGKILL and the bounded wait."""


@dataclass
class TreeStop:
    """What :func:`stop_tree` did, each mapping PID -> command name.

    Attributes
    ----------
    terminated
        Every process that was sent SIGTERM.
    killed
        Processes still running ``grace`` s after SIGTERM (or found only
        then), which were sent SIGKILL.
    survivors
        Processes still running ``kill_wait`` s after SIGKILL; only ever
        non-empty with ``strict=False`` (otherwise :class:`ProcessTreeError`).
    """

    terminated: dict[int, str] = field(default_factory=dict)
    killed: dict[int, str] = field(default_factory=dict)
    survivors: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _Proc:
    pid: int
    ppid: int
    pgrp: int
    sid: int
    state: str
    start: int  # start time in clock ticks since boot: (pid, start) names a process uniquely
    comm: str


def _read_stat(pid: int) -> _Proc | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may contain spaces and parentheses; it ends at the last ")".
    head, tail = raw.rsplit(")", 1)
    f = tail.split()
    return _Proc(pid, int(f[1]), int(f[2]), int(f[3]), f[0], int(f[19]), head.split("(", 1)[1])


def _snapshot() -> dict[int, _Proc]:
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (p := _read_stat(int(name))) is not None:
            out[p.pid] = p
    return out


def _children(snap: dict[int, _Proc]) -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for p in snap.values():
        children.setdefault(p.ppid, []).append(p.pid)
    return children


def _has_env_entry(pid: int, entry: bytes) -> bool:
    try:  # only our own user's processes are readable; others cannot carry our marker anyway
        return entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def tree_marker() -> tuple[str, str]:
    """A fresh ``(name, value)`` to put in a child's environment.

    Returns
    -------
    tuple of str
        :data:`TREE_MARKER_VAR` and a random value. Every process started
        from that child inherits it (Flower passes its environment on to
        SuperExec, the ServerApp and Ray's workers), so ``stop_tree(proc,
        marker="NAME=value")`` finds them even after they left its session
        and were re-parented.
    """
    return TREE_MARKER_VAR, uuid.uuid4().hex


class _Tree:
    """The processes of one tree, re-collected on every :meth:`members` call.

    A process is a member if it is ``root`` (while not yet reaped), a process
    already seen as a member (same PID *and* start time), in a session or
    process group of a member (other than those of this process and its
    ancestors), carries the environment entry ``marker``, or descends from a
    member. Sessions and groups survive their leader and follow a process
    that is re-parented to init or a subreaper, so they find orphans; the
    marker also finds those that started a session of their own.
    """

    def __init__(self, root: int | None, marker: str | None) -> None:
        self.root = root
        self.marker = marker.encode() if marker else None
        self.known: dict[int, int] = {}
        self.groups: set[int] = set()
        snap = _snapshot()
        # Never ours to signal: this process and its ancestors, and their sessions/groups
        # (a root started without start_new_session shares the caller's session).
        self.protected = {0, 1, os.getpid()}
        pid = os.getpid()
        while pid in snap and pid not in (0, 1):
            self.protected.add(pid)
            pid = snap[pid].ppid
        self.protected_groups = {0, 1, os.getsid(0), os.getpgid(0)}
        self.protected_groups |= {g for p in self.protected if p in snap for g in (snap[p].sid, snap[p].pgrp)}

    def members(self) -> dict[int, _Proc]:
        snap = _snapshot()
        # A PID, session or group number is only reused once nothing refers to it any more:
        # forget those that are gone, so a later process that gets the number is not taken for ours.
        self.known = {pid: start for pid, start in self.known.items() if pid in snap and snap[pid].start == start}
        self.groups &= {g for p in snap.values() for g in (p.sid, p.pgrp)}
        children = _children(snap)
        found = set(self.known)
        if self.root is not None and self.root in snap:
            found.add(self.root)
        marked: dict[int, bool] = {}
        while True:  # until closed under children, sessions and groups
            todo = list(found)
            while todo:
                for child in children.get(todo.pop(), []):
                    if child not in found and child not in self.protected:
                        found.add(child)
                        todo.append(child)
            self.groups |= {g for pid in found for g in (snap[pid].sid, snap[pid].pgrp)} - self.protected_groups
            more = set()
            for p in snap.values():
                if p.pid in found or p.pid in self.protected:
                    continue
                if p.sid in self.groups or p.pgrp in self.groups:
                    more.add(p.pid)
                elif self.marker is not None:
                    if p.pid not in marked:
                        marked[p.pid] = _has_env_entry(p.pid, self.marker)
                    if marked[p.pid]:
                        more.add(p.pid)
            if not more:
                break
            found |= more
        self.known.update({pid: snap[pid].start for pid in found})
        return {pid: snap[pid] for pid in found}

    def running(self) -> dict[int, _Proc]:
        return {pid: p for pid, p in self.members().items() if p.state not in _EXITED}


def _signal(p: _Proc, sig: int) -> bool:
    """Send ``sig`` to ``p`` unless its PID now names another process; True if sent."""
    try:
        fd = os.pidfd_open(p.pid)  # pins the process: no PID-reuse race between check and kill
    except ProcessLookupError:
        return False
    except OSError:  # no pidfd (old kernel): a short race remains
        fd = None
    try:
        now = _read_stat(p.pid)
        if now is None or now.start != p.start:
            return False
        if fd is None:
            os.kill(p.pid, sig)
        else:
            signal.pidfd_send_signal(fd, sig)
        return True
    except ProcessLookupError:
        return False
    finally:
        if fd is not None:
            os.close(fd)


def _names(procs: dict[int, str]) -> str:
    return ", ".join(f"{pid} ({comm})" for pid, comm in sorted(procs.items()))


def stop_tree(
    proc: subprocess.Popen,
    grace: float = 10.0,
    *,
    marker: str | None = None,
    kill_wait: float = 10.0,
    strict: bool = True,
    poll: float = 0.05,
) -> TreeStop:
    """Stop ``proc`` and every process of its tree; return once all have exited.

    Sends SIGTERM (and SIGCONT, for stopped ones) to the tree, waits up to
    ``grace`` s, SIGKILLs whatever still runs, then waits up to ``kill_wait``
    s for that to exit, and finally reaps ``proc``. The tree is collected
    again every ``poll`` s throughout, so processes started meanwhile, or
    re-parented away after their parent died, are signalled too. Zombies
    count as exited. This process, its ancestors and their sessions and
    process groups are never signalled.

    Parameters
    ----------
    proc
        The root. If it has already been reaped (``proc.returncode`` set), its
        PID may name another process by now and is not used: only ``marker``
        can then find what is left of its tree.
    grace
        Seconds between SIGTERM and SIGKILL.
    marker
        ``"NAME=value"``: every process whose initial environment holds this
        exact entry is a member too (see :func:`tree_marker`), however far it
        moved from the tree. Ignored, with a warning, if this process's own
        environment holds it (it would match our siblings).
    kill_wait
        Seconds to wait for SIGKILLed processes to disappear.
    strict
        Raise :class:`ProcessTreeError` if something survives ``kill_wait``;
        otherwise warn (``RuntimeWarning`` and stderr).
    poll
        Seconds between re-collections of the tree.

    Returns
    -------
    TreeStop
        The PIDs sent SIGTERM, the ones that needed SIGKILL (also printed to
        stderr, since a process that ignores SIGTERM is worth knowing about)
        and, with ``strict=False``, the survivors.

    Raises
    ------
    ProcessTreeError
        ``strict`` and processes of the tree still run ``kill_wait`` s after SIGKILL.
    """
    if marker is not None and marker in {f"{k}={v}" for k, v in os.environ.items()}:
        warnings.warn(f"stop_tree: ignoring marker {marker!r}, which this process carries itself",
                      RuntimeWarning, stacklevel=2)
        marker = None
    # proc is not reaped until the end: as a zombie it keeps its PID, session and group
    # numbers from being reused while they identify the tree.
    tree = _Tree(proc.pid if proc.returncode is None else None, marker)
    report = TreeStop()
    deadline = time.monotonic() + grace
    while True:
        running = tree.running()
        for pid, p in running.items():
            if pid not in report.terminated and _signal(p, signal.SIGTERM):
                _signal(p, signal.SIGCONT)
                report.terminated[pid] = p.comm
        if not running or time.monotonic() >= deadline:
            break
        time.sleep(poll)
    deadline = time.monotonic() + kill_wait
    while running:
        for pid, p in running.items():
            if _signal(p, signal.SIGKILL):
                report.killed.setdefault(pid, p.comm)
        expired = time.monotonic() >= deadline
        time.sleep(poll)  # SIGKILL is delivered asynchronously: look again before judging
        running = tree.running()
        if expired:
            break
    if report.killed:
        print(f"stop_tree: still running {grace:g} s after SIGTERM, sent SIGKILL: {_names(report.killed)}",
              file=sys.stderr, flush=True)
    report.survivors.update({pid: p.comm for pid, p in running.items()})
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=0 if proc.pid in running else kill_wait)
    if report.survivors:
        message = f"stop_tree: still running {kill_wait:g} s after SIGKILL: {_names(report.survivors)}"
        if strict:
            raise ProcessTreeError(message)
        print(message, file=sys.stderr, flush=True)
        warnings.warn(message, RuntimeWarning, stacklevel=2)
    return report
