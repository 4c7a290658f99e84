"""Dagster code location: resources, IO managers and assets (the only package that imports dagster)."""
