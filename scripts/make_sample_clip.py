"""Build telepresence/assets/sample.mp4, the embedded default capture source.

Source: LivePortrait example asset `lp_d0.mp4` (MIT, Kuaishou; licence copied
beside the output). The black letterbox rows at the bottom are cropped away
(keeping a centred square), the clip is resized to 384x384 and played forward
then backward (ping-pong) so that looping it has no visible jump.

    python scripts/make_sample_clip.py /work/shared/data/videos/lp_d0.mp4
"""

import argparse
import fractions
from pathlib import Path

import av
import cv2
import numpy as np


def crop_letterbox(image: np.ndarray, black_level: float = 4.0) -> np.ndarray:
    """[H, W, 3] uint8 -> the largest centred square above any black rows at the bottom."""
    rows = np.flatnonzero(image.mean(axis=(1, 2)) > black_level)
    height = int(rows[-1]) + 1 if rows.size else image.shape[0]
    side = min(height, image.shape[1])
    left = (image.shape[1] - side) // 2
    return image[height - side : height, left : left + side]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path)
    parser.add_argument("--out", type=Path, default=Path("telepresence/assets/sample.mp4"))
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--crf", type=int, default=20)
    args = parser.parse_args()

    with av.open(str(args.src)) as container:
        stream = container.streams.video[0]
        fps = stream.average_rate or fractions.Fraction(25)
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    frames = [cv2.resize(crop_letterbox(f), (args.size, args.size), interpolation=cv2.INTER_AREA) for f in frames]
    frames = frames + frames[-2:0:-1]  # ping-pong, without repeating the end frames

    with av.open(str(args.out), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = args.size
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(args.crf), "preset": "slow", "movflags": "+faststart"}
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    print(f"{args.out}: {len(frames)} frames at {float(fps):.1f} fps, {args.out.stat().st_size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
