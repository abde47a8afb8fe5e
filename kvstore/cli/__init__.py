"""The ``kvstore`` command line: one small module per command group, thin over the public API."""
