"""The coordinator: membership, assignment, leases, checkpoints and job state."""
