"""nbflow: notebook pipelines as durable workflows on NATS JetStream."""
__version__ = "0.1.0"


def load_ipython_extension(ipython):  # `%load_ext nbflow`
    from nbflow.magics.core import load_ipython_extension as _load

    _load(ipython)
