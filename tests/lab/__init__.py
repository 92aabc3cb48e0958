"""The VPC lab tier: the tests of the lab itself (test_lab_*) and every test that runs in it (a package, so
its conftest does not shadow tests/conftest.py as `conftest`)."""
