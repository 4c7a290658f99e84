"""Dagster definitions for the references area (thin: the science lives outside defs/)."""
