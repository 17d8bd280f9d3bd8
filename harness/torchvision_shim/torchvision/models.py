from ._stub import unavailable


def __getattr__(name):
    return unavailable(f"models.{name}")
