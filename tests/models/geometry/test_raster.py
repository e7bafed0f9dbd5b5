"""The vectorised rasterizer against a plain per-pixel twin."""
import pytest
import torch

from models.geometry.raster import _gathered_rows, interpolate, rasterize, weighted_rows


def naive_rasterize(pix, faces, H, W, near=1e-3):
    """Reference: loop over pixels and triangles in float64, nearest depth wins."""
    V = pix.shape[0]
    face_id = torch.full((V, H, W), -1, dtype=torch.long)
    depth = torch.zeros(V, H, W, dtype=torch.float64)
    bary = torch.zeros(V, H, W, 3, dtype=torch.float64)
    p = pix.double()
    for v in range(V):
        for i in range(H):
            for j in range(W):
                cx, cy = j + 0.5, i + 0.5
                best = float("inf")
                for f, (a, b, c) in enumerate(faces.tolist()):
                    (x0, y0, z0), (x1, y1, z1), (x2, y2, z2) = p[v, a].tolist(), p[v, b].tolist(), p[v, c].tolist()
                    if min(z0, z1, z2) <= near:
                        continue
                    area = (x1 - x0) * (y2 - y0) - (y1 - y0) * (x2 - x0)
                    if abs(area) < 1e-9:
                        continue
                    w0 = ((x2 - x1) * (cy - y1) - (y2 - y1) * (cx - x1)) / area
                    w1 = ((x0 - x2) * (cy - y2) - (y0 - y2) * (cx - x2)) / area
                    w2 = 1 - w0 - w1
                    if min(w0, w1, w2) < 0:
                        continue
                    inv_z = w0 / z0 + w1 / z1 + w2 / z2
                    z = 1 / inv_z
                    if z < best:
                        best = z
                        face_id[v, i, j] = f
                        depth[v, i, j] = z
                        bary[v, i, j] = torch.tensor([w0 / z0, w1 / z1, w2 / z2]) * z
    return face_id, depth, bary


def random_scene(seed, V=2, n_tris=10, H=20, W=24):
    g = torch.Generator().manual_seed(seed)
    n = 3 * n_tris
    xy = torch.rand(V, n, 2, generator=g) * torch.tensor([W * 1.3, H * 1.3]) - torch.tensor([W * 0.15, H * 0.15])
    z = torch.rand(V, n, 1, generator=g) * 2 + 0.5
    pix = torch.cat([xy, z], -1)
    faces = torch.arange(n).reshape(n_tris, 3)
    return pix, faces, H, W


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_the_plain_twin(seed):
    pix, faces, H, W = random_scene(seed)
    frags = rasterize(pix, faces, H, W)
    ref_id, ref_depth, ref_bary = naive_rasterize(pix, faces, H, W)
    agree = (frags.face_id == ref_id).float().mean()
    assert agree > 0.995  # only float32-vs-float64 ties on shared edges may differ
    same = (frags.face_id == ref_id) & (ref_id >= 0)
    assert same.sum() > 50
    assert torch.allclose(frags.depth[same].double(), ref_depth[same], rtol=1e-4)
    assert torch.allclose(frags.bary[same].double(), ref_bary[same], atol=1e-4)
    assert (frags.depth[frags.face_id < 0] == 0).all()


def _edge_cases(seed, V=2, H=70, W=90):
    """Triangles that test the exact raster's row spans: corners on pixel centres and pixel edges
    (edge functions exactly 0 at centres), slivers with near-horizontal and near-vertical edges,
    huge triangles cut by the picture, and tiny ones."""
    g = torch.Generator().manual_seed(seed)
    k = 120
    # Corners on the half-pixel lattice: many pixel centres exactly on an edge, where the rounding of
    # the edge functions decides (spans not widened past it lose a few pixels in every such scene).
    on_grid = torch.randint(-20, 2 * W + 20, (V, 5 * k, 2), generator=g).float() * 0.5
    sliver = torch.rand(V, k, 2, generator=g) * torch.tensor([W, H])
    sliver[:, 1::3] = sliver[:, 0::3] + torch.tensor([60.0, 1e-3])  # near-horizontal long edges
    sliver[:, 2::3] = sliver[:, 0::3] + torch.tensor([2e-3, 45.0])  # near-vertical ones
    huge = (torch.rand(V, k, 2, generator=g) - 0.5) * 4000 + torch.tensor([W / 2, H / 2])
    tiny = torch.rand(V, k, 2, generator=g) * torch.tensor([W, H])
    tiny = tiny + torch.rand(V, k, 2, generator=g) * 1.5 * torch.arange(k).remainder(3)[None, :, None]
    xy = torch.cat([on_grid, sliver, huge, tiny], 1)
    z = torch.rand(V, xy.shape[1], 1, generator=g) * 3 + 0.2
    pix = torch.cat([xy, z], -1)
    n = xy.shape[1]
    faces = torch.cat([torch.arange(n).reshape(-1, 3), torch.randint(0, n, (200, 3), generator=g)])
    return pix, faces, H, W


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_exact_row_spans_find_what_the_whole_boxes_find(seed):
    """The exact mode's candidates (per row, the columns the edge functions allow) give the same
    fragments as every pixel of every bounding box (the fixed-shape mode), bit for bit."""
    pix, faces, H, W = _edge_cases(seed)
    exact = rasterize(pix, faces, H, W)
    boxes = rasterize(pix, faces, H, W, capacity=int(rasterize(pix, faces, H, W, capacity=1).needed))
    assert (exact.face_id >= 0).sum() > 2000
    assert torch.equal(exact.face_id, boxes.face_id)
    assert torch.equal(exact.bary, boxes.bary) and torch.equal(exact.depth, boxes.depth)
    assert torch.equal(exact.needed, boxes.needed)


def test_is_deterministic_and_interpolates():
    pix, faces, H, W = random_scene(5, V=3, n_tris=30, H=48, W=40)
    a = rasterize(pix, faces, H, W)
    b = rasterize(pix, faces, H, W)
    assert torch.equal(a.face_id, b.face_id) and torch.equal(a.bary, b.bary)
    # Perspective-correct weights b'_i = (b_i / z_i) / sum_j (b_j / z_j) turn the corner
    # depths into sum_i b'_i z_i = 1 / sum_j (b_j / z_j): exactly the depth buffer.
    vals = interpolate(pix[..., 2:3], faces, a)[..., 0]
    covered = a.mask
    assert covered.any()
    assert torch.all(vals[~covered] == 0)
    assert torch.allclose(vals[covered], a.depth[covered], rtol=1e-4)


def test_weighted_rows_on_the_cpu_match_the_gathers_used_elsewhere():
    g = torch.Generator().manual_seed(3)
    table, index = torch.rand(50, 7, generator=g), torch.randint(0, 50, (400, 3), generator=g)
    weights = torch.rand(400, 3, generator=g)
    rows = weighted_rows(table, index, weights)
    twin = (table[index] * weights[..., None]).sum(1)  # [P, 3, C] written out, then summed
    assert torch.allclose(rows, twin, atol=1e-6) and torch.allclose(_gathered_rows(table, index, weights), twin, atol=1e-6)
    # strided weights (a slice of barycentrics) and a per-corner table, as the appearance memory passes them
    bary = torch.rand(400, 4, generator=g)[:, 1:]
    assert torch.allclose(weighted_rows(table, index, bary), _gathered_rows(table, index, bary), atol=1e-6)
    with pytest.raises(ValueError, match="expected table"):
        weighted_rows(table, index, weights[:, :2])


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"expected pix \[V, N, 3\]"):
        rasterize(torch.zeros(5, 3), torch.zeros(1, 3, dtype=torch.long), 8, 8)
    with pytest.raises(ValueError, match=r"expected faces \[F, 3\]"):
        rasterize(torch.zeros(1, 5, 3), torch.zeros(1, 4, dtype=torch.long), 8, 8)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    pix, faces, H, W = random_scene(7, V=4, n_tris=200, H=96, W=128)
    a = rasterize(pix, faces, H, W)
    b = rasterize(pix.cuda(), faces.cuda(), H, W)
    assert (a.face_id == b.face_id.cpu()).float().mean() > 0.999
    same = a.face_id == b.face_id.cpu()
    assert torch.allclose(a.depth[same], b.depth.cpu()[same], rtol=1e-5)


def test_float_divmod_is_exact_where_the_quotient_is_an_integer():
    """Multiples of d are where a reciprocal-multiply division can land just below an integer."""
    from models.geometry.raster import _divmod

    for d in (3, 7, 10, 4591, 13463, 262144):
        a = torch.cat([torch.arange(0, 40 * d, d), torch.arange(0, 40 * d, d) + d - 1, torch.arange(5000)])
        q, r = _divmod(a, d)
        assert torch.equal(q.long(), a // d) and torch.equal(r.long(), a % d)
        if torch.cuda.is_available():
            qc, rc = _divmod(a.cuda(), d)
            assert torch.equal(qc.long().cpu(), a // d) and torch.equal(rc.long().cpu(), a % d)
