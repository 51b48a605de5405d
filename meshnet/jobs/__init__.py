"""Jobs: the model, the kind registry, built-in kinds, and the queue and ledger cores."""
