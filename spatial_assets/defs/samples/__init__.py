"""Dagster definitions for the samples area (thin: the science lives outside defs/)."""
