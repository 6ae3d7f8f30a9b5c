"""The async Python client (issue 4): start, submit a code, terminate, wait for outcomes."""
