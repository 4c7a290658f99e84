"""Dagster definitions for the celltyping area (thin: the science lives outside defs/)."""
