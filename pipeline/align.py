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
# A threshold no landmark error reaches, so every point is an inlier and the
# Levenberg-Marquardt refinement gives the least-squares similarity over all five points.
ALL_INLIERS_PX = 1e6


def similarity_transform(landmarks: np.ndarray) -> np.ndarray | None:
    """The 2x3 rotation + uniform scale + translation taking `landmarks` (5,2) onto the template."""
    matrix, _ = cv2.estimateAffinePartial2D(
        np.asarray(landmarks, dtype=np.float32),
        ARCFACE_TEMPLATE,
        method=cv2.RANSAC,
        ransacReprojThreshold=ALL_INLIERS_PX,
    )
    return matrix


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
