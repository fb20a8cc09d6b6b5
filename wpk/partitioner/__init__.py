"""wpk.partitioner: choose where to cut a model across tiers, write slices and a plan."""
