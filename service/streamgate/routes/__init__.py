"""HTTP routes: chat (the three streaming routes) and health (healthz, readyz, metrics)."""
