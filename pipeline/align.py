"""5-point similarity alignment of faces onto the ArcFace 112x112 template.

The template is the one insightface's ArcFace models are trained on (left eye, right eye, nose tip,
left and right mouth corners, in the order MTCNN gives its landmarks), so aligned crops can go
straight into an ArcFace-style backbone such as the paper's IR-50.
"""

from __future__ import annotations

import cv2
import numpy as np

CROP_SIZE = 112
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float32,
)


def similarity_transform(landmarks: np.ndarray) -> np.ndarray | None:
    """The 2x3 rotation + uniform scale + translation taking `landmarks` (5,2) onto the template.

    The least-squares fit over all five points, in closed form (the optimum OpenCV's
    estimateAffinePartial2D reaches when every point is an inlier, in a fraction of its time).
    """
    points = np.asarray(landmarks, dtype=np.float64)
    if points.shape != (5, 2) or not np.all(np.isfinite(points)):
        return None
    source, target = points - points.mean(0), ARCFACE_TEMPLATE - ARCFACE_TEMPLATE.mean(0)
    spread = float((source**2).sum())
    if spread <= 0:
        return None
    a = float((source * target).sum()) / spread
    b = float((source[:, 0] * target[:, 1] - source[:, 1] * target[:, 0]).sum()) / spread
    rotation = np.array([[a, -b], [b, a]])
    shift = ARCFACE_TEMPLATE.mean(0) - rotation @ points.mean(0)
    return np.hstack([rotation, shift[:, None]])


def align_face(frame: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """The aligned (112,112,3) uint8 face; zeros when the landmarks give no transform."""
    matrix = similarity_transform(landmarks)
    if matrix is None or not np.all(np.isfinite(matrix)):
        return np.zeros((CROP_SIZE, CROP_SIZE, 3), dtype=np.uint8)
    return cv2.warpAffine(
        frame,
        matrix,
        (CROP_SIZE, CROP_SIZE),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )
