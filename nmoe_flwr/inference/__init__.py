"""Serverless NMoE inference: expert servers, the router, transports, checkpoints."""
