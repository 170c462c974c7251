"""Rollout: generation backends, tree builders and the actor loop (later issue)."""
