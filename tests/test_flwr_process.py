"""Process hygiene of ``nmoe_flwr.cli`` without Flower: ``process_tree.stop_tree``
returns only once a whole tree is gone (new sessions, SIGTERM ignored, orphans,
processes started while stopping), leaves other processes alone, and
``stream_flwr_run`` keeps its deadline even when the command prints nothing.

Every test uses local ``bash``/``sleep`` processes only, is bounded in time,
and kills whatever it started in teardown should an assertion fail first.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nmoe_flwr.cli.flwr_process import TIMEOUT_EXIT_CODE, sigterm_exits, stream_flwr_run
from nmoe_flwr.cli.process_tree import stop_tree, tree_marker

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _stat(pid: int) -> tuple[str, int, int, int] | None:
    """``(state, ppid, session, start time)`` of ``pid``, or None if it is not in /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[1]), int(fields[3]), int(fields[19])


def _pids_in(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def _gone(pid: int) -> bool:
    """Not running (zombies have exited). For processes whose start time was never
    recorded: a PID reused meanwhile could only make this fail, not pass wrongly."""
    s = _stat(pid)
    return s is None or s[0] in "ZX"


def _orphaned(pid: int, root: int) -> bool:
    """``pid`` runs, but neither as ``root``'s child nor grandchild (its parent exited)."""
    s = _stat(pid)
    parent = _stat(s[1]) if s else None
    return s is not None and s[1] != root and (parent is None or parent[1] != root)


def _wait_until_orphaned(pid: int, root: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not _orphaned(pid, root):
        assert time.monotonic() < deadline, f"{pid} still has its parent"
        time.sleep(0.02)


class Spawned:
    """What a test started: Popen objects and (pid, start time) of processes
    named in PID files, so teardown can SIGKILL leftovers (and only them)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.pids: dict[int, int] = {}

    def popen(self, script: str, **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(["bash", "-c", script], **kwargs)
        self.procs.append(proc)
        return proc

    def read_pids(self, path: Path, count: int, timeout: float = 20.0) -> list[int]:
        """The first ``count`` PIDs written to ``path`` (one a line), once all are running."""
        deadline = time.monotonic() + timeout
        while True:
            pids = _pids_in(path)[:count]
            stats = [_stat(pid) for pid in pids]
            if len(pids) == count and all(s is not None for s in stats):
                self.pids.update({pid: s[3] for pid, s in zip(pids, stats, strict=True)})
                return pids
            assert time.monotonic() < deadline, f"{path}: {pids}, expected {count} running PIDs"
            time.sleep(0.02)

    def running(self, pid: int) -> bool:
        """Whether the process recorded as ``pid`` still runs (zombies have exited)."""
        s = _stat(pid)
        return s is not None and s[3] == self.pids[pid] and s[0] not in "ZX"

    def cleanup(self) -> None:
        for pid in self.pids:
            if self.running(pid):
                os.kill(pid, signal.SIGKILL)
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


@pytest.fixture
def spawned():
    s = Spawned()
    yield s
    s.cleanup()


# Root (own session) -> a child with a grandchild; a child that ignores SIGTERM
# (SIG_IGN survives exec); a child that starts its own session and has a child there.
TREE = r"""
bash -c 'echo $$ >> "$P"; sleep 300 & echo $! >> "$P"; wait' &
bash -c 'trap "" TERM; echo $$ >> "$P"; exec sleep 300' &
setsid bash -c 'echo $$ >> "$P"; sleep 300 & echo $! >> "$P"; wait' &
wait
"""


def test_stop_tree_returns_only_when_whole_tree_is_gone(spawned, tmp_path):
    pidfile = tmp_path / "pids"
    root = spawned.popen(TREE, env={**os.environ, "P": str(pidfile)}, start_new_session=True)
    pids = spawned.read_pids(pidfile, 5)
    by_role = {}
    for pid in pids:
        _, ppid, sid, _ = _stat(pid)
        by_role.setdefault("setsid" if sid == pid else ("child" if ppid == root.pid else "grandchild"), []).append(pid)
    assert [len(by_role[r]) for r in ("child", "setsid", "grandchild")] == [2, 1, 2], by_role  # the tree is as described
    # The SIGTERM-ignoring child, exec'd into sleep (the other sleeps are grandchildren).
    (ignorer,) = [pid for pid in by_role["child"] if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"sleep")]

    t0 = time.monotonic()
    report = stop_tree(root, grace=1.0, kill_wait=10.0)
    elapsed = time.monotonic() - t0

    assert [pid for pid in [root.pid, *pids] if spawned.running(pid)] == []
    assert root.returncode is not None  # reaped
    assert set(pids) <= set(report.terminated)
    assert ignorer in report.killed, report
    assert report.survivors == {}
    assert elapsed < 1.0 + 10.0


def test_stop_tree_reports_sigkill_on_stderr(spawned, tmp_path, capfd):
    pidfile = tmp_path / "pids"
    root = spawned.popen("trap '' TERM; echo $$ > \"$P\"; exec sleep 300",
                         env={**os.environ, "P": str(pidfile)}, start_new_session=True)
    (pid,) = spawned.read_pids(pidfile, 1)
    report = stop_tree(root, grace=0.3)
    assert report.killed == {pid: "sleep"}
    assert f"sent SIGKILL: {pid} (sleep)" in capfd.readouterr().err
    assert not spawned.running(pid)


def test_stop_tree_stops_orphans_left_in_the_roots_session(spawned, tmp_path):
    """A grandchild whose parent exited before stop_tree (re-parented to init or a
    subreaper, as Ray's workers can be) is no descendant any more; no marker is given,
    so only the root's session ties it to the tree."""
    pidfile = tmp_path / "pids"
    root = spawned.popen('(sleep 300 & echo $! >> "$P"); sleep 300 & echo $! >> "$P"; wait',
                         env={**os.environ, "P": str(pidfile)}, start_new_session=True)
    orphan, child = spawned.read_pids(pidfile, 2)  # the subshell writes first: it has no wait
    _wait_until_orphaned(orphan, root.pid)
    assert _stat(child)[1] == root.pid
    pids = [orphan, child]
    report = stop_tree(root, grace=2.0)
    assert [pid for pid in pids if spawned.running(pid)] == []
    assert set(pids) <= set(report.terminated)


def test_stop_tree_catches_processes_started_while_stopping(spawned, tmp_path):
    """On SIGTERM the root starts a child (that ignores SIGTERM) and exits: the child is
    orphaned right away, after the tree was first listed (as Ray may start a worker
    during teardown), and is found again only through the root's session.

    The root ignores SIGTERM before starting the child, so the child ignores it from
    birth: a ``trap`` inside the child would leave a window in which the SIGTERM that
    stop_tree sends to the new process kills it first (seen under load). The root waits
    in a loop of short sleeps, not ``sleep 300 & wait``: when its ``sleep`` died of the
    same SIGTERM, bash could reach the end of the script and exit before running the
    trap (also seen under load)."""
    pidfile, late = tmp_path / "pids", tmp_path / "late.sh"
    late.write_text("echo $$ > \"$P.late\"\nexec sleep 300\n")
    root = spawned.popen(
        'trap \'trap "" TERM; bash "$L" & while [ ! -s "$P.late" ]; do sleep 0.01; done; exit 0\' TERM;'
        ' echo $$ >> "$P"; while :; do sleep 0.05; done',
        env={**os.environ, "P": str(pidfile), "L": str(late)}, start_new_session=True,
    )
    spawned.read_pids(pidfile, 1)
    report = stop_tree(root, grace=2.0)
    (late_pid,) = _pids_in(Path(f"{pidfile}.late"))
    assert _gone(late_pid), (report, _stat(late_pid))  # the report says what stop_tree saw
    assert late_pid in report.killed  # it ignored SIGTERM: SIGKILLed once found again


def test_stop_tree_stops_reparented_daemon_carrying_the_marker(spawned, tmp_path):
    """A double-forked daemon in its own session whose parent exited before stop_tree:
    neither a descendant nor in the root's session; only the marker ties it to the tree."""
    pidfile = tmp_path / "pids"
    name, value = tree_marker()
    root = spawned.popen(
        "(setsid bash -c 'echo $$ >> \"$P\"; exec sleep 300' &); sleep 300 & echo $! >> \"$P\"; wait",
        env={**os.environ, "P": str(pidfile), name: value}, start_new_session=True,
    )
    pids = spawned.read_pids(pidfile, 2)
    (daemon,) = [pid for pid in pids if _stat(pid)[2] == pid]
    _wait_until_orphaned(daemon, root.pid)
    assert _stat(daemon)[2] != _stat(root.pid)[2]  # neither a descendant nor in the root's session
    report = stop_tree(root, grace=2.0, marker=f"{name}={value}")
    assert [pid for pid in pids if spawned.running(pid)] == []
    assert daemon in report.terminated


def test_stop_tree_leaves_other_processes_alone(spawned, tmp_path):
    """A root in the caller's session (no start_new_session), an unrelated process in
    that session, and one in its own session carrying another tree's marker all survive."""
    pidfile = tmp_path / "pids"
    name, value = tree_marker()
    env = {**os.environ, "P": str(pidfile)}
    spawned.popen("echo $$ >> \"$P\"; exec sleep 300", env=env)
    spawned.read_pids(pidfile, 1)
    spawned.popen("echo $$ >> \"$P\"; exec sleep 300", env={**env, name: "other-" + value}, start_new_session=True)
    spawned.read_pids(pidfile, 2)
    root = spawned.popen("sleep 300 & echo $! >> \"$P\"; wait", env={**env, name: value})
    bystander, other_tree, root_child = spawned.read_pids(pidfile, 3)
    assert _stat(root_child)[2] == os.getsid(0) == _stat(bystander)[2]  # all in our session

    stop_tree(root, grace=2.0, marker=f"{name}={value}")
    assert not spawned.running(root_child)
    assert spawned.running(bystander) and spawned.running(other_tree)
    assert _stat(os.getpid())[0] not in "ZX"


def test_stop_tree_after_the_root_was_reaped_uses_only_the_marker(spawned, tmp_path):
    """A reaped root's PID (and so its session number) may name someone else by now:
    without a marker nothing is signalled; with it, the orphans left behind are stopped."""
    pidfile = tmp_path / "pids"
    name, value = tree_marker()
    root = spawned.popen('sleep 300 & echo $! >> "$P"', env={**os.environ, "P": str(pidfile), name: value},
                         start_new_session=True)
    root.wait(10)
    (orphan,) = spawned.read_pids(pidfile, 1)
    assert stop_tree(root, grace=2.0).terminated == {}
    assert spawned.running(orphan)
    report = stop_tree(root, grace=2.0, marker=f"{name}={value}")
    assert list(report.terminated) == [orphan]
    assert not spawned.running(orphan)


def test_stream_flwr_run_times_out_on_a_silent_command(tmp_path, capsys):
    pidfile, log = tmp_path / "pids", tmp_path / "run.log"
    cmd = ["bash", "-c", 'echo $$ >> "$P"; sleep 60 & echo $! >> "$P"; sleep 60']
    t0 = time.monotonic()
    run_id, code = stream_flwr_run(cmd, {**os.environ, "P": str(pidfile)}, tmp_path, log, timeout=2.0)
    elapsed = time.monotonic() - t0
    assert (run_id, code) == (None, TIMEOUT_EXIT_CODE)
    assert 2.0 <= elapsed < 2.0 + 5.0, elapsed
    pids = _pids_in(pidfile)
    assert len(pids) == 2 and all(_gone(pid) for pid in pids), pids
    assert "timed out after 2 s" in log.read_text()
    assert "timed out after 2 s" in capsys.readouterr().out


def test_stream_flwr_run_keeps_the_run_id_when_it_times_out(tmp_path):
    cmd = ["bash", "-c", "echo 'Successfully started run 7'; sleep 60"]
    t0 = time.monotonic()
    assert stream_flwr_run(cmd, dict(os.environ), tmp_path, None, timeout=1.5) == ("7", TIMEOUT_EXIT_CODE)
    assert time.monotonic() - t0 < 1.5 + 5.0


def test_stream_flwr_run_captures_run_id_output_and_exit_code(tmp_path, capsys):
    log = tmp_path / "run.log"
    cmd = ["bash", "-c", r"printf 'starting\r\nSuccessfully started run 123\n'; echo oops >&2; printf 'no newline'"]
    assert stream_flwr_run(cmd, dict(os.environ), tmp_path, log, timeout=30) == ("123", 0)
    expected = "starting\nSuccessfully started run 123\noops\nno newline\n"
    assert log.read_text() == expected
    assert capsys.readouterr().out.endswith(expected)


def test_stream_flwr_run_passes_on_a_failing_exit_code(tmp_path):
    assert stream_flwr_run(["bash", "-c", "echo hi; exit 3"], dict(os.environ), tmp_path, None, timeout=30) == (None, 3)


def test_stream_flwr_run_stops_the_command_when_interrupted(tmp_path):
    """Ctrl-C (here: KeyboardInterrupt from a SIGALRM handler) stops the command's tree before propagating."""
    pidfile = tmp_path / "pids"

    def interrupt(*_):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 1.0)
        with pytest.raises(KeyboardInterrupt):
            stream_flwr_run(["bash", "-c", 'echo $$ >> "$P"; sleep 60 & echo $! >> "$P"; wait'],
                            {**os.environ, "P": str(pidfile)}, tmp_path, None, timeout=60)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    pids = _pids_in(pidfile)
    assert len(pids) == 2 and all(_gone(pid) for pid in pids), pids


def _killed_with_sigterm(tmp_path: Path, guarded: bool) -> tuple[int, bool]:
    """Exit status of a Python child killed with SIGTERM while sleeping in a ``try``, and whether
    its ``finally`` ran (as the SuperLink's cleanup in ``launch`` must)."""
    marker = tmp_path / f"cleaned-{guarded}"
    body = "    try:\n        print('ready', flush=True)\n        time.sleep(30)\n" \
           f"    finally:\n        open({str(marker)!r}, 'w').write('yes')\n"
    head = "with sigterm_exits():\n" if guarded else "if True:\n"
    code = "import time\nfrom nmoe_flwr.cli.flwr_process import sigterm_exits\n" + head + body
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return code, marker.exists()


def test_a_plain_kill_of_a_launcher_runs_its_cleanup(tmp_path):
    """Without sigterm_exits, SIGTERM ends Python with no ``finally`` run (a launcher would
    leave its SuperLink and Ray behind); with it, the cleanup runs and the exit status is 143."""
    assert _killed_with_sigterm(tmp_path, guarded=False) == (-signal.SIGTERM, False)
    assert _killed_with_sigterm(tmp_path, guarded=True) == (143, True)


def test_sigterm_exits_restores_the_previous_handler():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exc, sigterm_exits():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises at the next bytecode, long before this ends
    assert exc.value.code == 143
    assert signal.getsignal(signal.SIGTERM) is before
