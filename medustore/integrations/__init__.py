"""Adapters between medustore and FL frameworks (imported on demand, never at package import).

- `medustore.integrations.flower`: `MedustoreStrategy` (wraps any Flower Message-API
  strategy) and `MedustoreFedAvg` (legacy FedAvg), recording every round into an archive.

PyTorch needs no adapter: `medustore.open(..., model=module_or_state_dict)` takes modules and
state_dicts directly, and reads return ``out="state_dict"``.
"""
