"""The ServerApp's side of each pipeline: which messages go out, in which order.

``messaging`` (the :class:`~.messaging.Federation`: node discovery, one
message per node, replies checked, a partially averaged stage),
``extractor`` (the registry of stage-1 methods), ``nmoe`` (stages 2-3 and the
NMoE evaluation), ``probes`` (pooled extractor probes with their floors, the
router ceiling), ``baselines``, ``alignment`` (the global-MoE pipeline),
``results`` (results.json, rounds.csv) and ``plots``.

May import flwr, the strategies, :mod:`nmoe_flwr.algorithms`, data, config,
constants and records. Imported by ``server_app`` only (and tests); never by
the ClientApp, whose side of each message lives in ``client_app``.
"""
