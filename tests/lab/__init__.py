"""Tests of the VPC lab (a package, so its conftest does not shadow tests/conftest.py as `conftest`)."""
