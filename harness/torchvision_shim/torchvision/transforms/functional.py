import enum

from .._stub import unavailable


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"


rotate = unavailable("transforms.functional.rotate")
