"""Engines in worker processes: the protocol (protocol.py), the worker's side (main.py) and the daemon's
side (process.py). See core/hosts.py for how an instance chooses between a worker process and a thread."""
