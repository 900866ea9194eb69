"""The scheduler: pure placement over cluster snapshots, and the leader loop that writes it."""
