"""Integrations of flexebt with other libraries (each imported on demand)."""
