"""Imports every family adapter so that it registers itself (one line per family)."""
