"""Local infrastructure for the demo, the tests, the benchmarks and CI.

Starts what is missing (a Docker engine, a Redis server, the base python runtime image) under the
project's state directory and stops exactly what it started. Nothing here is used by a deployed cluster:
there, Ansible installs and supervises the same services.
"""
