"""Where things are, for every test tier and helper."""

import os

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(TESTS)
SUPPORT = os.path.join(TESTS, "support")
DATA = os.path.join(TESTS, "data")
BUNDLE = os.path.join(ROOT, "dist", "aws-vpc-cni")  # the frozen bundle `make build` makes
DIST_BIN = os.path.join(ROOT, "dist", "bin")  # its program links
