"""End-to-end federated demo: a backdoored FedAvg run on scikit-learn's digits, unlearned.

Modules, one idea each:

- `medustore.demo.data`: the dataset, the user splits and the pixel backdoor;
- `medustore.demo.model`: the small torch model and its metrics;
- `medustore.demo.federated`: local training and FedAvg with a per-round callback,
  independent of the store (reused for retraining from scratch);
- `medustore.demo.run`: the demo itself: record, unlearn, retrain, summarise.

Needs the ``demo`` extra (torch, scikit-learn).
"""
