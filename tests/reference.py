"""The worked examples of the reference material on convolution, shared by the tests.

Each is checked at every level: `convolution` in-process, the server over gRPC, and
the client SDK against a real server.
"""

from __future__ import annotations

import numpy as np

# corr2d(X, K): the first worked example of 2-D cross-correlation.
X3 = [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
K2 = [[0, 1], [2, 3]]
Y3 = [[19, 25], [37, 43]]

# A 7x7 image, a 3x3 kernel and bias 1: a convolution layer as cross-correlation plus bias.
IMAGE7 = [
    [0, 0, 0, 0, 0, 0, 0],
    [0, 1, 0, 1, 2, 1, 0],
    [0, 0, 2, 2, 0, 1, 0],
    [0, 1, 1, 0, 2, 1, 0],
    [0, 0, 2, 1, 1, 0, 0],
    [0, 2, 1, 1, 2, 0, 0],
    [0, 0, 0, 0, 0, 0, 0],
]
W7 = [[0, 0, -1], [0, 1, 0], [-2, 0, 2]]
Y7 = [
    [6, 5, -2, 1, 2],
    [3, 0, 3, 2, -2],
    [4, 2, -1, 0, 0],
    [2, 1, 2, -1, -3],
    [1, 1, 1, 3, 1],
]

# Edge detection: the kernel [1, -1] finds the vertical edges of a 6x8 image.
EDGE_KERNEL = [[1, -1]]


def edge_image() -> np.ndarray:
    """A 6x8 image of ones with columns 2-5 zero."""
    image = np.ones((6, 8))
    image[:, 2:6] = 0.0
    return image


def edge_response() -> np.ndarray:
    """What [1, -1] makes of `edge_image`: 1 in column 1, -1 in column 5, 0 elsewhere."""
    response = np.zeros((6, 7))
    response[:, 1] = 1.0
    response[:, 5] = -1.0
    return response
