"""Tool environments, tasks and rewards (later issue)."""
