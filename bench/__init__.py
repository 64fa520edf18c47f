"""The benchmark suite (``pytest bench/ --benchmark-only``) and its report (``python -m bench.report``)."""
