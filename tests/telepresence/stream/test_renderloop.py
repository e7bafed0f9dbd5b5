"""The render loop's hand-offs: with just_in_time, face analysis keeps pace with a slow pipeline
instead of analysing every camera frame, and the frame rendered is as fresh."""

import threading
import time

import numpy as np
import pytest

from telepresence.pipeline import Analysis, FrameResult
from telepresence.stream.renderloop import RenderLoop
from tests.helpers import ScriptedSource


class SlowPipeline:
    """analyze() takes analysis_s, process() process_s; records when each frame was captured and processed."""

    size, device, refiner_name = 16, "cpu", None

    def __init__(self, analysis_s: float, process_s: float) -> None:
        self.analysis_s, self.process_s = analysis_s, process_s
        self.analysed = 0
        self.ages_s: list[float] = []  # how old each processed frame was when its pipeline call began
        self.captured: dict[int, float] = {}
        self.lock = threading.Lock()

    def analyze(self, frame_rgb):
        time.sleep(self.analysis_s)
        with self.lock:
            self.analysed += 1
        return Analysis(True, self.analysis_s * 1e3)

    def process(self, frame_rgb, poses, analysis=None):
        self.ages_s.append(time.monotonic() - self.captured[int(frame_rgb[0, 0, 0])])
        time.sleep(self.process_s)
        return FrameResult([np.zeros((16, 16, 3), np.uint8) for _ in poses], True, "ok")


def run(just_in_time: bool, seconds: float = 2.0):
    pipeline = SlowPipeline(analysis_s=0.02, process_s=0.15)

    def draw(i):
        pipeline.captured[i % 256] = time.monotonic()
        return np.full((16, 16, 3), i % 256, np.uint8)

    loop = RenderLoop(ScriptedSource(draw, fps=50), pipeline, just_in_time=just_in_time)
    loop.add_view("v", None, lambda view: None)
    loop.start()
    time.sleep(seconds)
    loop.stop()
    return pipeline


@pytest.mark.slow
def test_just_in_time_analysis_keeps_pace_with_the_pipeline_and_renders_as_fresh_frames():
    every = run(just_in_time=False)
    paced = run(just_in_time=True)
    print(f"analyses per pipeline call: every frame {every.analysed / len(every.ages_s):.1f}, "
          f"just in time {paced.analysed / len(paced.ages_s):.1f}; median age of a rendered frame: "
          f"{np.median(every.ages_s) * 1e3:.0f} ms, {np.median(paced.ages_s) * 1e3:.0f} ms")
    assert every.analysed > 4 * len(every.ages_s)  # the camera's 50 fps against ~6 pipeline calls a second
    assert paced.analysed <= len(paced.ages_s) + 2 and len(paced.ages_s) >= 0.8 * len(every.ages_s)
    # ready when the pipeline is: the frame it gets was captured about one analysis (+ a camera interval) before
    assert np.median(paced.ages_s) < np.median(every.ages_s) + 0.03
