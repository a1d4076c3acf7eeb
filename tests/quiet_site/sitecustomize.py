"""Imported by Python at start-up in the test suite's CLI subprocesses (see tests/quiet.py)."""

from tests.quiet import silence_third_party

silence_third_party()
