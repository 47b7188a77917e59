"""A Flower app (Message API) whose server records every round into a medustore archive."""
