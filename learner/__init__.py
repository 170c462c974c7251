"""Training: credit assignment, ATPO losses, the DeepSpeed engine, weight publishing (later issue)."""
