"""How a job runs: validation, the lease, a supervised trainer subprocess, restarts, the CLI.
Never imports torch: the trainer runs in its own process."""
