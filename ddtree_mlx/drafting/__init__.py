"""Drafters: the protocol, a DFlash block-diffusion drafter, prompt lookup, the two mixed, and an oracle for
benchmarks and tests."""
