"""Prefect faces of moecl: the self-evolution flow, its deployments and the artifacts it publishes."""
