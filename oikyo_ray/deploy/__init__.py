"""Gated deploys: eval gates, a staging load test against budgets, then an alias move (oikyo deploy)."""
