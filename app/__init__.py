"""bgjobs-server: an HTTP job queue with leases, retries and history."""
