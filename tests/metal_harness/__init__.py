"""CPU harness for the ddtree Metal kernels: see harness.py."""
