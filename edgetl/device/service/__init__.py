"""The device as a service: an HTTP API and a web page (``edgetl device serve``), Starlette +
uvicorn. :mod:`.state` holds the learner's thread and the training job, :mod:`.handlers` the
API's functions, :mod:`.app` the routes, the token gate and the page (``web/``)."""

from .state import HOLDOUT_EVERY, LOCAL_HOSTS, Limits, Service, check_binding, new_token

__all__ = ["HOLDOUT_EVERY", "LOCAL_HOSTS", "Limits", "Service", "check_binding", "create_app", "new_token"]


def __getattr__(name: str):
    if name == "create_app":  # Starlette is imported only when an app is made
        from .app import create_app

        return create_app
    raise AttributeError(name)
