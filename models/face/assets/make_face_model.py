"""Rebuild face_model.npz from MediaPipe's face-geometry data (Apache-2.0).

    python telepresence/assets/make_face_model.py DIR_WITH_canonical_face_model.obj

The archive holds the canonical face model (468 vertices in centimetres,
x = subject's left on screen = picture right, y up, z towards the viewer),
its 898 triangles (0-based), the Procrustes landmark weights MediaPipe uses
for its head-pose fit, and the face-oval loop in order.
"""
import re
import sys
from pathlib import Path

import numpy as np


def main(src: Path) -> None:
    verts, faces = [], []
    for line in (src / "canonical_face_model.obj").read_text().splitlines():
        if line.startswith("v "):
            verts.append([float(v) for v in line.split()[1:4]])
        elif line.startswith("f "):
            faces.append([int(tok.split("/")[0]) - 1 for tok in line.split()[1:4]])
    meta = (src / "geometry_pipeline_metadata_landmarks.pbtxt").read_text()
    pairs = re.findall(r"landmark_id: (\d+) weight: ([0-9.eE-]+)", meta)
    ids = np.array([int(i) for i, _ in pairs], np.int64)
    weights = np.array([float(w) for _, w in pairs], np.float32)
    from mediapipe.python.solutions.face_mesh_connections import FACEMESH_FACE_OVAL

    nxt = dict(FACEMESH_FACE_OVAL)
    loop = [10]
    while nxt[loop[-1]] != loop[0]:
        loop.append(nxt[loop[-1]])
    out = Path(__file__).with_name("face_model.npz")
    np.savez_compressed(
        out,
        vertices_cm=np.array(verts, np.float32),
        triangles=np.array(faces, np.int32),
        procrustes_ids=ids,
        procrustes_weights=weights,
        face_oval=np.array(loop, np.int64),
    )
    print(f"wrote {out}: {len(verts)} vertices, {len(faces)} triangles, oval {len(loop)}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
