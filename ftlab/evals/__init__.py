"""The evaluators' family: what a run measures at each eval."""
