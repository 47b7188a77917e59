"""medustore: compressed, indexed storage of federated-learning updates, built to unlearn."""

__version__ = "0.1.0"
