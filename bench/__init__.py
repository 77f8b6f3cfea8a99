"""grbfl's benchmarks: `python -m bench` (or `make bench`) measures each figure of
issue 6 against a baseline measured in the same run; see bench/__main__.py."""
