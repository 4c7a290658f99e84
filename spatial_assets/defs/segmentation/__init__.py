"""Dagster definitions for raw instrument folders: reading, segmentation, QC (thin: the science lives outside defs/)."""
