"""The command lines an operator runs; nothing in the apps imports this package.

``run`` (``nmoe-run``: ``flwr run`` in local simulation, offline, with a real
exit status), ``deploy_loopback`` (``nmoe-deploy-loopback``: the deployment
engine on 127.0.0.1 with TLS), ``compare_alignment``
(``nmoe-compare-alignment``), ``inference`` (``nmoe serve-expert`` /
``nmoe infer``), ``plain_fedce`` (stage 1 in one process, no Flower: the
reference for benchmarks and the GPU machine), ``report`` (markdown tables
from results.json), and ``flwr_process`` (the Flower process helpers they
share: offline environment, SuperLink, streaming ``flwr run``, run status,
stopping process trees).

May import anything in :mod:`nmoe_flwr`. Must not be imported by the
ServerApp, the ClientApp, the pipelines, the strategies, inference or the
algorithms (a test checks), so that the apps never depend on operator tooling.
"""
