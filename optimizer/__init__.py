"""wpk.optimizer: tune each slice of a plan for the hardware of its tier (the WPK method)."""
