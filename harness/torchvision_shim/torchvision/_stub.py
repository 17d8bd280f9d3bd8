def unavailable(name):
    def call(*args, **kwargs):
        raise RuntimeError(f"torchvision.{name} is not available in the Mix-of-Show test harness")
    return call
