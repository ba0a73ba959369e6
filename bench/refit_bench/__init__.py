"""refit's benchmark and demo scripts (`refit-bench`, `make demo`)."""
