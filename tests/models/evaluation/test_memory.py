"""The memory mode's feed: the frames up to the reference, every N-th, minus the excluded spans."""
import numpy as np

from models.evaluation.clips import ClipIndex, ClipIndexConfig
from models.evaluation.memory import memory_frame_ids


def index_of(n: int, missing=()) -> ClipIndex:
    found = np.ones(n, bool)
    found[list(missing)] = False
    return ClipIndex(path="synthetic.mp4", config=ClipIndexConfig(), image_size=(64, 64), fps=10.0,
                     frame_ids=np.arange(n), found=found, landmarks=np.zeros((n, 478, 3), np.float32),
                     pose_deg=np.zeros((n, 3), np.float32), masks=np.zeros((n, 8, 8), np.uint8))


def test_frames_up_to_the_reference_minus_missing_faces_and_excluded_spans():
    index = index_of(30, missing=[2])
    assert memory_frame_ids(index, 5) == [0, 1, 3, 4, 5]  # the reference itself last, as the sender has it
    assert memory_frame_ids(index, 20, [(0.55, 1.45)]) == [0, 1, 3, 4, 5, 15, 16, 17, 18, 19, 20]
    assert memory_frame_ids(index, 20, [(0.0, 0.35), (1.0, 1.9)], every=2) == [5, 7, 9, 20]  # every other face: 0 3 5 7 9 ...
