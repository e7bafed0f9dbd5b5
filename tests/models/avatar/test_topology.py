"""The mesh topology: the head is wound outward, and culling it (and skipping transparent
card cells) changes no picture."""
import dataclasses

import torch

from models.avatar import build_avatar, render_views
from models.geometry.camera import OrbitPose, project


def test_culling_and_skipping_do_not_change_the_picture(analyzer, astronaut):
    """Back-face culling of the (outward-wound, closed) head's shell and skipping fully
    transparent card cells are pure speed-ups: the plain twin draws everything. The face mesh is
    drawn from both sides (it folds at an open mouth: test_artifacts' test_no_view_sees_through_the_face)."""
    avatar = build_avatar(astronaut, analyzer.analyze(astronaut), render_size=128)
    assert avatar.cull.sum() > 500 and not avatar.cull[:898].any() and avatar.skip.sum() > 0
    poses = [OrbitPose(yaw_deg=y, pitch_deg=p) for y, p in ((-35, 0), (0, 0), (30, 10))]
    fast = render_views(avatar, poses, 128)
    # A new avatar, not writes into this one's masks: cull is the topology's constant, shared by every avatar
    # of the process (writing into it changed later tests' pictures).
    plain = render_views(dataclasses.replace(avatar, cull=torch.zeros_like(avatar.cull),
                                             skip=torch.zeros_like(avatar.skip)), poses, 128)
    assert avatar.cull.sum() > 500  # the shared constant is untouched
    assert (fast.rgb - plain.rgb).abs().mean() < 1e-3
    assert ((fast.rgb - plain.rgb).abs() > 0.1).float().mean() < 0.002
    # Outward winding: the face seen from the front has negative screen area everywhere but the edges.
    viewmats, Ks = avatar.cameras([OrbitPose()], 128)
    tri = project(avatar.verts[None], viewmats, Ks)[0][avatar.faces[:898]]
    x, y = tri[..., 0], tri[..., 1]
    area = (x[:, 1] - x[:, 0]) * (y[:, 2] - y[:, 0]) - (y[:, 1] - y[:, 0]) * (x[:, 2] - x[:, 0])
    assert (area < 0).float().mean() > 0.9


def test_incident_sums_are_the_padded_gather_and_sum_bit_for_bit():
    """The CPU sums each vertex's faces over its real entries only (embedding_bag over ragged lanes);
    the padded gather and sum (every other device's path) give the same bits: vertex normals and the
    fill colours' diffusion change by nothing."""
    from models.avatar.geometry import incident_sum
    from models.avatar.texture import _triangle_means
    from models.avatar.topology import mesh_constants, mesh_topology
    from models.avatar.types import AvatarConfig

    config = AvatarConfig()
    g = torch.Generator().manual_seed(0)
    for far in (False, True):
        key = (config.shell_rings, config.card_grid, far)
        st = mesh_constants(mesh_topology(*key), key, torch.device("cpu"))
        n_head_faces = int(st.head_incident.max())
        assert st.incident.shape[1] > 6 * 4  # mostly padding: the pole has a face per sweep
        for incident, bags, n_faces in ((st.incident, st.incident_bags, st.faces.shape[0]),
                                        (st.head_incident, st.head_incident_bags, n_head_faces)):
            for C in (3, 8):  # the normals; the diffusion's colour, weight, colour, weight
                table = torch.randn(n_faces, C, generator=g)
                plain = torch.cat([table, table.new_zeros(1, C)])[incident].sum(1)
                assert torch.equal(incident_sum(table, incident, bags), plain)
        values = torch.rand(st.head_incident.shape[0], 8, generator=g)
        faces = st.faces[:n_head_faces]
        assert torch.equal(_triangle_means(values, faces), values[faces].mean(1))
