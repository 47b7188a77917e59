"""The ClientApp: trains on its partition and reports its partition id with its update.

The ``partition-id`` metric is what the server's `MedustoreStrategy` keys users by; without
it, users would be recorded under their Flower node ids, which change from run to run.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from medustore_flower_example.task import Net, load_partition, train

app = ClientApp()


@app.train()
def train_fn(msg: Message, context: Context) -> Message:
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    config = msg.content["config"]
    seed, server_round = int(config.get("seed", 0)), int(config["server-round"])
    max_examples = int(config.get("max-examples", 0)) or None

    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = load_partition(partition_id, num_partitions, seed, max_examples)
    loss = train(model, x, y, epochs=int(config.get("local-epochs", 1)),
                 lr=float(config.get("lr", 0.1)), batch_size=int(config.get("batch-size", 32)),
                 seed=seed * 1_000_003 + server_round * 1009 + partition_id)

    content = RecordDict({
        "arrays": ArrayRecord(model.state_dict()),  # keys: the state_dict's, as in the archive
        "metrics": MetricRecord({
            "train-loss": loss,
            "num-examples": len(y),        # FedAvg's weight, and the archive's
            "partition-id": partition_id,  # the stable user id medustore records
        }),
    })
    return Message(content=content, reply_to=msg)
