"""The layout planner: which TP x PP x DP layout to launch, with predicted memory and step time."""
