"""nmoe-flwr: Networked Mixture-of-Experts trained and run with Flower."""

__version__ = "0.1.0"
