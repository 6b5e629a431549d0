"""Chaos suite: random SIGKILLs of workers, engines and the nats-server under load."""
