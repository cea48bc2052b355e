"""Decision-task evaluation."""
