"""Running batches: validation jobs, chunk leases, dispatch, checkpoints, finalization."""
