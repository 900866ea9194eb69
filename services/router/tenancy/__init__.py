"""Who calls and what they may use: identity (gate), the tenant book, quotas, the fair queue,
usage (chargeback)."""
