"""The seed's HTTP API on the worker's web server (issue 4)."""
