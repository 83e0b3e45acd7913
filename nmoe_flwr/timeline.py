"""Where a message's seconds go on a client: a Flower mod that writes one timeline line per message.

On the deployment engine every message starts a fresh ClientApp process
(issue 13), so a round's time is mostly not training. :func:`timeline_mod`
records, per message, wall-clock times (``time.time()``, seconds) of

- ``created``: the server created the message (its metadata);
- ``process-start``: this ClientApp process started (``/proc``, Linux);
- ``package-import``: this package started importing, i.e. Flower's own
  start-up in the process (Python, flwr, connect, pull the message, install
  the FAB) is over;
- ``imported``: our imports (torch, the app's modules) are done;
- ``handler-start`` / ``handler-end``: our handler ran;

and appends them as one JSON line to ``timeline.jsonl`` in the client's
folder (:class:`~nmoe_flwr.client_state.ClientStore`). Flower starts one
process per message on the deployment engine; in simulation the process is
a long-lived Ray actor and only the handler's times mean anything.
``benchmarks/deploy_timeline.py`` puts the gaps next to the round times.
"""

from __future__ import annotations

import json
import os
import time
from itertools import pairwise
from logging import WARNING
from pathlib import Path

from flwr.app import Context, Message
from flwr.supercore import log

from . import IMPORT_STARTED_AT
from .client_state import ClientEnv
from .constants import CONFIG, SERVER_ROUND

#: When this module was imported, after torch, flwr and the client's modules (imported above).
IMPORTED_AT = time.time()

TIMELINE_FILE = "timeline.jsonl"
STAGES = ("created", "process-start", "package-import", "imported", "handler-start", "handler-end")


def process_started_at(pid: int | str = "self") -> float | None:
    """Wall-clock start time of a process (``None`` where ``/proc`` is not there)."""
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
    except (OSError, StopIteration, IndexError, ValueError):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def timeline_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower mod: run the handler, then append its timeline line (never fails the reply)."""
    start = time.time()
    reply = call_next(msg, context)
    end = time.time()
    try:
        config = msg.content.config_records.get(CONFIG, {})
        line = {
            "message-type": msg.metadata.message_type,
            "round": int(config[SERVER_ROUND]) if SERVER_ROUND in config else None,
            "created": msg.metadata.created_at,
            "process-start": process_started_at(),
            "package-import": IMPORT_STARTED_AT,
            "imported": IMPORTED_AT,
            "handler-start": start,
            "handler-end": end,
            "pid": os.getpid(),
        }
        store = ClientEnv.of(context).store
        store.folder.mkdir(parents=True, exist_ok=True)
        with (store.folder / TIMELINE_FILE).open("a") as fh:
            fh.write(json.dumps(line) + "\n")
    except Exception as exc:  # noqa: BLE001 -- a timeline must never cost a reply
        log(WARNING, "timeline line not written: %s", exc)
    return reply


def read_timeline(path: Path) -> list[dict]:
    """The lines of a ``timeline.jsonl``."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def gaps(line: dict) -> dict[str, float]:
    """Seconds between the consecutive stages of one timeline line (those present)."""
    present = [s for s in STAGES if line.get(s) is not None]
    return {f"{a} -> {b}": line[b] - line[a] for a, b in pairwise(present)}
