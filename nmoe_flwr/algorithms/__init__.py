"""The algorithms: plain torch and numpy, no Flower, no grpc.

What one client (or a centralized baseline) computes, and the pure maths the
server's strategies call: models, the one training loop and evaluation,
seeding, privacy, one module per training stage or method (``fedce``,
``fedsc``, ``experts``, ``gate``, ``global_moe``, ``centralized``), feature
``probes``, routing diagnostics and oracles (``routing``) and the
client–expert ``alignment`` scores and rules.

May import: torch, numpy, scipy, opacus, :mod:`nmoe_flwr.config`,
:mod:`nmoe_flwr.constants` and :mod:`nmoe_flwr.data`. Must not import
``flwr`` or ``grpc`` (a test checks), so that this layer runs where Flower is
not installed (the lent GPU machine) and in benchmarks. Imported by the
ClientApp, the pipelines, the strategies, inference and the command lines.
"""
