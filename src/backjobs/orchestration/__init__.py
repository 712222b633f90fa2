"""Prefect-facing parts: the job base, prefect.yaml, the dashboard gate, the local stack."""
