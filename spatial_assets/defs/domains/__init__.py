"""Dagster definitions for the domains area (thin: the science lives outside defs/)."""
