"""The `wasi-compress` command line: thin click commands over the Python API."""
