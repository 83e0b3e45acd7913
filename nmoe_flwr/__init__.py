"""nmoe-flwr: Networked Mixture-of-Experts trained and run with Flower.

The Flower app is ``server_app:app`` and ``client_app:app``; what a client
keeps between messages is ``client_state``; ``config`` (the run config),
``constants`` (every wire key), ``records`` (state dicts <-> Flower records),
``capacity`` (client capacity profiles) and ``workspace`` (where a run
writes) are shared by all. The folders: ``algorithms/`` (plain torch, no
Flower), ``data/``, ``pipelines/`` (the server's side), ``strategies/``
(public), ``inference/`` (serverless routing) and ``cli/`` (command lines).
README.md's "Architecture" section walks one run through them.
"""

import time as _time

__version__ = "0.1.0"

#: When this package started importing: in a ClientApp process, the end of Flower's own start-up
#: (connect, pull the task, install the FAB) and the start of ours (``timeline``, issue 13).
IMPORT_STARTED_AT = _time.time()
