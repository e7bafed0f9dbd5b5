"""The mesh's fixed part: the canonical head (cranium ellipsoid, shell sweep), the topology
(which vertex is which; head triangles wound outward) and its constants on each device."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from models.face.analysis import NUM_MESH_VERTICES, face_model

__all__ = ["CARD_KNOTS", "CRANIUM_CENTRE", "CRANIUM_RADII", "EXPRESSION_LANDMARKS", "FACE_DETAIL_WEIGHTS", "JAW_FLOOR",
           "MOUTH_CORNERS", "MeshConstants", "Topology", "mesh_constants", "mesh_topology", "sweep_shell"]


# Cranium ellipsoid in the head frame (x right, y down, z into the head; metres),
# sized for an adult head with some hair around the canonical face model.
CRANIUM_CENTRE = (0.0, -0.02, 0.025)
CRANIUM_RADII = (0.088, 0.115, 0.120)
# MediaPipe face-mesh landmark ids of the expression regions (the vertices of
# mediapipe.solutions.face_mesh_connections' FACEMESH_LIPS, _LEFT_EYE, _RIGHT_EYE, _LEFT_EYEBROW,
# _RIGHT_EYEBROW). models.avatar.memory grows them by two rings of mesh neighbours, the face's
# detail fade (MeshConstants.face_detail) by one.
EXPRESSION_LANDMARKS = (
    0, 13, 14, 17, 37, 39, 40, 61, 78, 80, 81, 82, 84, 87, 88, 91, 95, 146, 178, 181, 185, 191, 267, 269, 270, 291,
    308, 310, 311, 312, 314, 317, 318, 321, 324, 375, 402, 405, 409, 415,  # lips
    249, 263, 362, 373, 374, 380, 381, 382, 384, 385, 386, 387, 388, 390, 398, 466,  # left eye
    7, 33, 133, 144, 145, 153, 154, 155, 157, 158, 159, 160, 161, 163, 173, 246,  # right eye
    276, 282, 283, 285, 293, 295, 296, 300, 334, 336,  # left eyebrow
    46, 52, 53, 55, 63, 65, 66, 70, 105, 107,  # right eyebrow
)
# How far the face's finest detail fades at large angles (models.avatar.render.face_detail_fade):
# fully on the skin, half as far on the expression regions (eyes, brows, lips: what a person is
# recognised by keeps some of its detail).
FACE_DETAIL_WEIGHTS = (1.0, 0.5)
# The shell's floor under the jaw's sides. The sweeps from the face outline between the mouth's corners' height and the
# chin (head frame, y down: from JAW_FLOOR[1] to JAW_FLOOR[2] below the corners, faded in over 0.5 cm above and out by
# JAW_FLOOR[3]) keep every ring at most JAW_FLOOR[0] below the outline vertex they start from. The cranium ellipsoid
# alone put that floor up to 1.2 cm below the jaw line out to the ears: turned and seen from below, a dark swollen band
# along the jaw (the hair's colour diffused onto surface the source never saw). The chin's own sweeps keep it: in near-frontal views that shell carries
# the source's shadow under the chin, which the face-mesh detector finds the chin by (raised too, the validation clips'
# landmark error +0.05 % IOD; docs/results/eval_multiview.md, twenty-eighth and twenty-ninth sessions).
JAW_FLOOR = (0.005, -0.005, 0.03, 0.04)
MOUTH_CORNERS = (61, 291)
# Card depth offset (metres) against height below the chin (face heights).
CARD_KNOTS = ((-0.3, 0.05, 0.35, 1.2), (0.02, -0.015, -0.03, -0.05))


@dataclass(frozen=True)
class Topology:
    """Vertex ids and triangles of one mesh layout. Vertex order: face mesh, shell (ring-major,
    then the pole), card (row-major), far layer."""

    faces: np.ndarray  # [F, 3]; head triangles (the first n_head_faces) wound outward
    n_head_faces: int  # face-mesh and shell triangles: a closed surface (the shell's back faces are culled)
    n_face: int  # face-mesh vertices
    n_shell: int  # shell vertices (rings 1..K and the pole)
    n_card: int
    n_far: int
    ring_ids: np.ndarray  # [K + 1, J] vertex ids per ring (ring 0 = face outline)
    pole: int
    mirror: np.ndarray  # [N] each vertex's mirror image across the head's plane of symmetry (itself off the head)


_TOPOLOGY_CACHE: dict[tuple[int, int, bool], Topology] = {}


def _grid_faces(rows: int, cols: int, base: int) -> np.ndarray:
    idx = np.arange(rows * cols).reshape(rows, cols) + base
    a, b, c, d = idx[:-1, :-1], idx[:-1, 1:], idx[1:, :-1], idx[1:, 1:]
    return np.concatenate([np.stack([a, c, b], -1).reshape(-1, 3), np.stack([b, c, d], -1).reshape(-1, 3)])


def mesh_topology(rings: int, card: int, far: bool) -> Topology:
    """The mesh layout for ``rings`` shell rings, a ``card`` x ``card`` card and an optional
    far layer (made once per setting)."""
    key = (rings, card, far)
    if key in _TOPOLOGY_CACHE:
        return _TOPOLOGY_CACHE[key]
    model = face_model()
    oval = model.face_oval  # [J]
    J = len(oval)
    n_face = NUM_MESH_VERTICES
    ring_ids = [oval]
    for k in range(1, rings + 1):
        ring_ids.append(n_face + (k - 1) * J + np.arange(J))
    ring_ids = np.stack(ring_ids)  # [K + 1, J]
    pole = n_face + rings * J
    faces = [model.triangles]
    for k in range(rings):
        a, b = ring_ids[k], ring_ids[k + 1]
        a2, b2 = np.roll(a, -1), np.roll(b, -1)
        faces += [np.stack([a, b, a2], -1), np.stack([a2, b, b2], -1)]
    last = ring_ids[-1]
    faces.append(np.stack([last, np.full(J, pole), np.roll(last, -1)], -1))
    n_shell = rings * J + 1
    base = n_face + n_shell
    faces.append(_grid_faces(card, card, base))
    n_card = card * card
    n_far = 0
    if far:
        faces.append(_grid_faces(4, 4, base + n_card))
        n_far = 16
    faces = np.concatenate(faces).astype(np.int64)
    n_head_faces = len(model.triangles) + 2 * rings * J + J
    faces[:n_head_faces] = _orient_outward(faces[:n_head_faces], n_face, ring_ids, pole, rings)
    mirror = np.arange(n_face + n_shell + n_card + n_far)
    mirror[:n_face] = _mirror_pairs(model.vertices)
    # The shell's sweeps start on the face outline: sweep j mirrors the sweep of the outline's mirror vertex.
    position = {int(v): i for i, v in enumerate(oval)}
    mirror_sweep = np.array([position[int(mirror[v])] for v in oval])
    mirror[ring_ids[1:].reshape(-1)] = ring_ids[1:][:, mirror_sweep].reshape(-1)
    topo = Topology(
        faces=faces,
        n_head_faces=n_head_faces,
        n_face=n_face,
        n_shell=n_shell,
        n_card=n_card,
        n_far=n_far,
        ring_ids=ring_ids,
        pole=pole,
        mirror=mirror,
    )
    _TOPOLOGY_CACHE[key] = topo
    return topo


def _mirror_pairs(vertices: np.ndarray) -> np.ndarray:
    """[V] the mirror image of each canonical face-mesh vertex (x -> -x in the head frame):
    MediaPipe's canonical mesh is exactly symmetric, so each vertex has a partner (itself
    on the midline)."""
    flipped = vertices * np.array([-1.0, 1.0, 1.0], vertices.dtype)
    d2 = ((vertices[:, None] - flipped[None]) ** 2).sum(-1)
    pairs = d2.argmin(1)
    if not np.array_equal(pairs[pairs], np.arange(len(vertices))) or d2.min(1).max() > 1e-8:
        raise ValueError("expected a left/right symmetric canonical face mesh")
    return pairs


def _orient_outward(faces: np.ndarray, n_face: int, ring_ids: np.ndarray, pole: int, rings: int) -> np.ndarray:
    """Wind every head triangle so that its normal (b - a) x (c - a) points away from
    the cranium centre, judged on the canonical head (the winding is topological)."""
    model = face_model()
    face_head = torch.from_numpy(model.vertices).double()
    const = {"centre": torch.tensor(CRANIUM_CENTRE).double(), "radii": torch.tensor(CRANIUM_RADII).double(),
             "back": torch.tensor([0.0, 0.0, 1.0]).double(), "corners": torch.tensor(MOUTH_CORNERS)}
    shell = sweep_shell(face_head, torch.as_tensor(ring_ids[0]), rings, 1.0, const)
    verts = torch.cat([face_head, shell]).numpy().astype(np.float64)
    tri = verts[faces]
    normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    outward = tri.mean(1) - np.array(CRANIUM_CENTRE)
    flip = (normal * outward).sum(1) < 0
    out = faces.copy()
    out[flip] = out[flip][:, [0, 2, 1]]
    return out


def sweep_shell(face_head: torch.Tensor, ring0: torch.Tensor, rings: int, cranium_scale: float,
                 const: dict[str, torch.Tensor]) -> torch.Tensor:
    """Shell vertices [rings * J + 1, 3] in the head frame: each face-outline vertex is
    swept along a great circle about the cranium centre to the back of the head, its
    radius blending from the outline's to the cranium ellipsoid's within ~2.5 rings; under the jaw's sides no lower than
    JAW_FLOOR allows."""
    dt, device = face_head.dtype, face_head.device
    c, back = const["centre"], const["back"]
    radii = const["radii"] * cranium_scale
    d0 = face_head.index_select(0, ring0) - c  # [J, 3]
    r0 = d0.norm(dim=-1, keepdim=True)
    d0 = d0 / r0
    omega = torch.acos((d0 @ back).clamp(-0.999, 0.999))[:, None]  # [J, 1]
    K = rings
    s = torch.arange(1, K + 1, dtype=dt, device=device)[None, :] / (K + 1)  # [1, K]
    # Spherical interpolation from the outline direction to the back direction.
    wa = torch.sin((1 - s) * omega) / torch.sin(omega)
    wb = torch.sin(s * omega) / torch.sin(omega)
    u = wa[..., None] * d0[:, None, :] + wb[..., None] * back  # [J, K, 3]
    u = u / u.norm(dim=-1, keepdim=True)
    r_ell = 1.0 / ((u / radii).pow(2).sum(-1)).sqrt()  # [J, K]
    blend = (s * (K + 1) / 2.5).clamp(max=1.0)
    blend = blend * blend * (3 - 2 * blend)
    r = r0 * (1 - blend) + r_ell * blend
    shell = c + u * r[..., None]  # [J, K, 3]
    shell = _lift_jaw_floor(shell, face_head, ring0, const["corners"])
    shell = shell.transpose(0, 1).reshape(-1, 3)  # ring-major, matching mesh_topology
    pole = c + back * (1.0 / (back / radii).pow(2).sum().sqrt())
    return torch.cat([shell, pole[None]])


def _smoothstep(t: torch.Tensor) -> torch.Tensor:
    t = t.clamp(0.0, 1.0)
    return t * t * (3 - 2 * t)


def _lift_jaw_floor(sweeps: torch.Tensor, face_head: torch.Tensor, ring0: torch.Tensor,
                    corners: torch.Tensor) -> torch.Tensor:
    """Sweeps [J, K, 3] (head frame) with the floor under the jaw's sides raised to JAW_FLOOR: ring points more than
    JAW_FLOOR[0] below their sweep's outline vertex move up to that height, on the sweeps that start between the mouth's
    corners' height and the chin (weights ramped over 0.5 cm above and 1 cm below, so a sweep never jumps between
    frames as the expression moves the corners)."""
    margin, top, bottom, gone = JAW_FLOOR
    y0 = face_head.index_select(0, ring0)[:, 1]  # [J]
    below = y0 - face_head.index_select(0, corners)[:, 1].amax()  # [J] how far below the mouth's corners
    weight = _smoothstep((below - (top - 0.005)) / 0.005) * (1 - _smoothstep((below - bottom) / (gone - bottom)))
    excess = (sweeps[..., 1] - (y0 + margin)[:, None]).clamp(min=0.0)  # [J, K]
    return torch.cat([sweeps[..., :1], (sweeps[..., 1] - weight[:, None] * excess)[..., None], sweeps[..., 2:]], -1)


@dataclass(frozen=True)
class MeshConstants:
    """Per-topology constants, built once per device (outside any CUDA-graph capture). Every avatar of the
    process shares them (Avatar.cull, .faces): read only, never written into."""

    faces: torch.Tensor  # [F, 3] on the device
    cull: torch.Tensor  # [F] bool on the device: the shell past its first two rings (culled when facing away)
    not_head: torch.Tensor  # [F] bool on the device (source depth draws the head only)
    card_faces: torch.Tensor  # [F] bool on the device
    card_verts: torch.Tensor  # [N] bool on the device
    flags: torch.Tensor  # [N, 2] on the device: face mesh, head (face mesh and shell)
    ring_ids: torch.Tensor  # [K + 1, J] on the device
    ring0: torch.Tensor  # [J] face outline vertex ids on the device
    mirror: torch.Tensor  # [N] mirror vertex ids on the device (models.avatar.topology.Topology.mirror)
    incident: torch.Tensor  # [N, D] faces of each vertex, padded with F
    part: torch.Tensor  # [F] int64 on the device: 0 face mesh, 1 shell, 2 card, 3 far layer
    face_detail: torch.Tensor  # [F] float on the device: how far each triangle's detail fades (FACE_DETAIL_WEIGHTS; 0 off the face)
    head_incident: torch.Tensor  # [n_face + n_shell, D] faces of each head vertex (all head faces), padded with n_head_faces
    incident_bags: tuple[torch.Tensor, torch.Tensor]  # incident as ragged bags (models.avatar.geometry.incident_sum)
    head_incident_bags: tuple[torch.Tensor, torch.Tensor]  # head_incident likewise
    card_d2: torch.Tensor  # [G * G, G * G] squared distances between card vertices, in grid cells
    const: dict[str, torch.Tensor]  # cranium centre, radii, back direction, card knots, the mouth's corners' ids


_MESH_CONSTANTS: dict[tuple, MeshConstants] = {}
# torch's CPU sum over a padded dimension of 36 adds four running sums (entries k, k + 4, k + 8, ...) in order.
INCIDENT_LANES = 4


def incident_bags(incident: torch.Tensor, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The real entries of padded lists incident [N, D] (padding ``pad``) as embedding_bag's ragged bags:
    (indices [M], offsets [INCIDENT_LANES N]). Bag l N + i holds row i's entries in columns l, l + lanes,
    ... in order (models.avatar.geometry.incident_sum adds the lanes as torch's CPU sum does)."""
    lanes = [incident[:, lane::INCIDENT_LANES] for lane in range(INCIDENT_LANES)]
    lengths = torch.cat([(cols != pad).sum(1) for cols in lanes])  # [lanes N]
    indices = torch.cat([cols[cols != pad] for cols in lanes])  # row-major: each row's entries in order
    return indices, torch.cumsum(lengths, 0) - lengths


def mesh_constants(topo: Topology, key: tuple, device: torch.device) -> MeshConstants:
    """The constants of ``topo`` (made by :func:`mesh_topology` from ``key``) on ``device``, made once."""
    k = key + (str(device),)
    if k in _MESH_CONSTANTS:
        return _MESH_CONSTANTS[k]
    faces = torch.as_tensor(topo.faces)
    cull = torch.zeros(len(faces), dtype=torch.bool)
    n_tri = len(face_model().triangles)
    # The shell is culled where it faces away. The face mesh is drawn from both sides: it folds where MediaPipe's
    # landmarks cross in a turned view (an open mouth's inner lips, the nostrils), and through a culled fold the view
    # saw the shell's inside and the card behind the head, a jagged black line along the lips at yaw +-25..40 (on the
    # validation clips landmark error 1.59 -> 1.55 % IOD; docs/results/eval_validation.md). The first shell rings may
    # fold under the face outline (the cranium is narrower than the cheeks): drawn from both sides as well, so a
    # turned head shows no seam.
    cull[n_tri : topo.n_head_faces] = True
    J = topo.ring_ids.shape[1]
    cull[n_tri : n_tri + 2 * 2 * J] = False
    not_head = torch.ones(len(faces), dtype=torch.bool)
    not_head[: topo.n_head_faces] = False
    card = (topo.n_face + topo.n_shell, topo.n_face + topo.n_shell + topo.n_card)
    card_faces = ((faces >= card[0]) & (faces < card[1])).all(-1)
    N = topo.n_face + topo.n_shell + topo.n_card + topo.n_far
    card_verts = torch.zeros(N, dtype=torch.bool)
    card_verts[card[0] : card[1]] = True
    flags = torch.zeros(N, 2)
    flags[: topo.n_face, 0] = 1.0  # the face mesh
    flags[: topo.n_face + topo.n_shell, 1] = 1.0  # head
    # Faces of each vertex, padded with the index F.
    per_vertex = [[] for _ in range(N)]
    for fi, tri in enumerate(topo.faces.tolist()):
        for vi in tri:
            per_vertex[vi].append(fi)
    D = max(len(p) for p in per_vertex)
    incident = torch.tensor([p + [len(faces)] * (D - len(p)) for p in per_vertex], dtype=torch.int64)
    const = {
        "centre": torch.tensor(CRANIUM_CENTRE),
        "radii": torch.tensor(CRANIUM_RADII),
        "back": torch.tensor([0.0, 0.0, 1.0]),
        "knots_x": torch.tensor(CARD_KNOTS[0]),
        "knots_y": torch.tensor(CARD_KNOTS[1]),
        "corners": torch.tensor(MOUTH_CORNERS),
    }
    n_head = topo.n_face + topo.n_shell
    head_incident = incident[:n_head].clone()
    head_incident[head_incident >= topo.n_head_faces] = topo.n_head_faces
    G = round(topo.n_card**0.5)
    cell = torch.stack(torch.meshgrid(torch.arange(G), torch.arange(G), indexing="ij"), -1).reshape(-1, 2).float()
    card_d2 = (cell[:, None] - cell[None]).square().sum(-1)
    ring_ids = torch.as_tensor(topo.ring_ids)
    part = torch.full((len(faces),), 3, dtype=torch.int64)
    part[card_faces] = 2
    part[:n_tri] = 0
    part[n_tri : topo.n_head_faces] = 1
    # Expression regions grown by one ring of face-mesh neighbours: triangles touching them.
    expression = torch.zeros(N)
    expression[list(EXPRESSION_LANDMARKS)] = 1.0
    tri = faces[:n_tri]
    expression.scatter_reduce_(0, tri.reshape(-1), expression[tri].amax(-1)[:, None].expand(-1, 3).reshape(-1), "amax")
    face_detail = torch.zeros(len(faces))
    face_detail[:n_tri] = torch.where(expression[tri].amax(-1) > 0, FACE_DETAIL_WEIGHTS[1], FACE_DETAIL_WEIGHTS[0])
    st = MeshConstants(
        faces.to(device), cull.to(device), not_head.to(device), card_faces.to(device), card_verts.to(device),
        flags.to(device), ring_ids.to(device), ring_ids[0].to(device), torch.as_tensor(topo.mirror).to(device),
        incident.to(device), part.to(device), face_detail.to(device), head_incident.to(device),
        tuple(t.to(device) for t in incident_bags(incident, len(faces))),
        tuple(t.to(device) for t in incident_bags(head_incident, topo.n_head_faces)), card_d2.to(device),
        {name: v.to(device) for name, v in const.items()},
    )
    _MESH_CONSTANTS[k] = st
    return st
