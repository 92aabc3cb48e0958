"""The cluster-scale simulation (issue #16 point 2): `make scale` runs `python -m tests.scale.run`;
tests/lab/test_scale.py runs a short version. See tests/scale/sim.py."""
