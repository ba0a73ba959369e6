"""One module per dependency whose internals refit relies on; each names the versions it was checked against."""
