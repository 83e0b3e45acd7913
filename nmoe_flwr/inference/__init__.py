"""Serverless NMoE inference: expert servers, the router, transports, checkpoints.

``wire`` (tensors as raw bytes with a dtype/shape header, never pickles),
``server`` (a gRPC expert server), ``router`` (the gate picks experts, the
router asks their owners, with fallbacks), ``checkpoint`` (what each device
keeps after training) and ``evaluation`` (the training-time NMoE score,
through the same Router with an in-process transport).

May import :mod:`nmoe_flwr.algorithms`, :mod:`nmoe_flwr.constants`, torch and
grpc; not ``flwr``: a device serves its expert without Flower. Imported by
the ClientApp (evaluation, checkpoints) and the ``nmoe`` command line.
"""
