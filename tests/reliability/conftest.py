"""Fixtures for the reliability matrix: the power-cut harness's releases (one
signing key, small deterministic images and their bundles, built once)."""

from tests.powercut.conftest import releases

__all__ = ["releases"]
