"""Operating at2po: the CLI root, supervisors, benchmarks and deployment files."""
