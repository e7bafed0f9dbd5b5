"""Appearance memory: a turning head keeps what earlier frames saw, in layers by the head's pose; resets
(asked, face lost, another person), a fixed size however long the call, expression regions from the current frame."""
import numpy as np
import pytest
import torch

from models.avatar import build_avatar, precompiled, render_views
from models.avatar.atlas import memory_atlas, observe_texels
from models.avatar.memory import AppearanceMemory, MemoryConfig
from models.geometry.camera import OrbitPose
from tests.models.avatar.synthetic_head import head_frame_colour, turning_head_frame

CONFIG = MemoryConfig(texels=64)
TURN = (0, 15, 30, 45, 60, 45, 30, 15, 0)


def avatar_at(yaw_deg: float, tint: float = 1.0):
    image, obs, R = turning_head_frame(yaw_deg, tint)
    return build_avatar(image, obs, render_size=128), image, obs, R


@pytest.fixture(scope="module")
def turned():
    """The memory after the head turned to 60 degrees and back, and the last frame."""
    memory = AppearanceMemory(CONFIG)
    for i, yaw in enumerate(TURN):
        avatar, image, obs, R = avatar_at(yaw)
        with_memory = memory.observe(avatar, image, obs, t_s=i / 30)
    return memory, avatar, with_memory, R


def view_colours(memory, texels):
    """The colours renders sample [n, 3] at covered texels (indices into the atlas's texel list)."""
    return memory.colours()[0, :3].reshape(3, -1)[:, memory.atlas.texel_ids[texels]].t()


def test_a_turning_head_keeps_texels_seen_earlier(turned):
    memory, avatar, _, R = turned
    _, q_now = observe_texels(memory.atlas, avatar)
    head = ~memory.atlas.texel_card
    kept = head & (memory.confidence.amax(0) > 0.25) & (q_now < 0.05)  # seen well then, badly now
    assert kept.sum() > 0.05 * head.sum(), f"{int(kept.sum())} of {int(head.sum())} head texels kept"
    # Their colours are the head's there (the texel's point on the last frame's mesh).
    b = memory.atlas.texel_bary[kept][..., None]
    points = (b * avatar.verts[memory.atlas.texel_vid[kept]]).sum(1).numpy()
    truth = torch.from_numpy(head_frame_colour(points, R)).float()
    error = (view_colours(memory, kept) - truth).abs().mean().item()
    assert error < 0.08, f"kept texels off the true colour by {error:.3f}"


def test_renders_use_the_memory_where_the_frame_saw_badly(turned):
    """At yaw 55 from the last (frontal) frame, the side of the head the memory holds comes out
    nearer the true colours than the single-frame avatar's fill and mirror."""
    memory, avatar, with_memory, R = turned
    pose = [OrbitPose(yaw_deg=-55), OrbitPose(yaw_deg=55)]
    single, remembered = render_views(avatar, pose, 128), render_views(with_memory, pose, 128)
    viewmats, Ks = avatar.cameras(pose, 128)
    errors = []
    for out in (single, remembered):
        err = []
        for v in range(2):
            ys, xs = torch.meshgrid(torch.arange(128) + 0.5, torch.arange(128) + 0.5, indexing="ij")
            z = out.depth[v, 0]
            cam = torch.stack([(xs - Ks[v, 0, 2]) / Ks[v, 0, 0] * z, (ys - Ks[v, 1, 2]) / Ks[v, 1, 1] * z, z], -1)
            world = (cam - viewmats[v, :3, 3]) @ viewmats[v, :3, :3]  # camera -> source frame
            truth = torch.from_numpy(head_frame_colour(world.numpy().astype(np.float64), R)).float()
            area = (single.seen[v, 0] < 0.3) & (out.alpha[v, 0] > 0.99) & (z > 0)
            err.append((out.rgb[v].permute(1, 2, 0) - truth)[area].abs().mean().item())
        errors.append(err)
    # The side the head turned to (one of the two views) improves; the other side is as before.
    (single0, single1), (mem0, mem1) = errors
    message = f"unseen side per view: {errors[0]} single frame, {errors[1]} with memory"
    assert min(mem0 / single0, mem1 / single1) < 0.7, message
    assert max(mem0 / single0, mem1 / single1) < 1.05, message


def test_reset_forgets_and_renders_as_without_memory(turned):
    memory, avatar, _, _ = turned
    memory = AppearanceMemory(CONFIG)
    memory.observe(avatar_at(45)[0], t_s=0.0)
    assert memory.fill_fraction().item() > 0.1
    memory.reset()
    assert memory.fill_fraction().item() == 0.0 and memory.confidence.abs().sum() == 0
    memory.update(avatar)
    memory.reset()
    pose = [OrbitPose(yaw_deg=40)]
    empty = render_views(memory.attach(avatar), pose, 128)
    assert torch.equal(empty.rgb, render_views(avatar, pose, 128).rgb)


def test_face_lost_for_a_while_resets():
    avatar = avatar_at(30)[0]
    memory = AppearanceMemory(MemoryConfig(texels=32, lost_after_s=1.0))
    memory.observe(avatar, t_s=0.0)
    memory.missed(t_s=0.1)
    memory.missed(t_s=0.9)
    assert memory.resets == 0 and memory.fill_fraction().item() > 0  # lost briefly: kept
    memory.observe(avatar, t_s=1.0)
    memory.missed(t_s=1.1)
    memory.missed(t_s=2.2)
    assert memory.resets == 1 and memory.fill_fraction().item() == 0.0


def test_another_person_resets():
    """An injected identity: descriptors 0 then, from frame 4, far away (a different person)."""
    calls = []

    def identity(image, obs):
        calls.append(len(calls))
        return np.full(8, 0.0 if len(calls) <= 2 else 1.0, np.float32)

    memory = AppearanceMemory(MemoryConfig(texels=32, identity_every=2), identity=identity)
    avatar, image, obs, _ = avatar_at(20)
    for i in range(6):
        memory.observe(avatar, image, obs, t_s=i / 30)
    assert len(calls) == 3  # frames 0, 2, 4: a cheap check, not every frame
    assert memory.resets == 1
    assert memory._frames == 2  # frames 4 (which found the new person) and 5 are what the memory holds


def test_memory_size_is_fixed_however_long_the_call():
    memory = AppearanceMemory(MemoryConfig(texels=32))
    avatars = [avatar_at(yaw)[0] for yaw in (0, 30)]
    memory.update(avatars[0])
    size, pointers = memory.nbytes, [t.data_ptr() for t in (memory.colour, memory.confidence, memory.view)]
    for i in range(300):
        memory.update(avatars[i % 2])
    assert memory.nbytes == size and size < 8_000_000  # 13 layers of about 10 x 32^2 texels
    assert [t.data_ptr() for t in (memory.colour, memory.confidence, memory.view)] == pointers
    assert memory.confidence.max().item() <= CONFIG.cap


def test_expression_regions_follow_the_current_frame(turned):
    memory, avatar, with_memory, _ = turned
    atlas = memory.atlas
    expression = atlas.texel_static < 1e-6
    assert expression.sum() > 100
    weight = memory.view[0, 4].reshape(-1)[atlas.texel_ids]
    assert weight[expression].abs().max() == 0 and weight[~expression].max() > 0.5
    assert memory.view[0, 5].reshape(-1)[atlas.texel_ids][expression].abs().max() == 0  # nor over the own texture
    # The mouth and eyes in a turned view: the same pixels with and without the memory.
    pose = [OrbitPose(yaw_deg=50)]
    lm = avatar.project_landmarks(pose, 128)[0]
    a, b = render_views(avatar, pose, 128).rgb[0], render_views(with_memory, pose, 128).rgb[0]
    for i in (13, 14, 159, 145, 386, 374):  # lips, eyelids
        x, y = lm[i].floor().long().tolist()
        assert torch.allclose(a[:, y, x], b[:, y, x], atol=1e-3), f"landmark {i}"


def test_lighting_drift_is_carried_by_the_ratio():
    """Memory from a darker call, the current frame brighter: the remembered side comes out lit as now."""
    memory = AppearanceMemory(CONFIG)
    for i, yaw in enumerate((60, 45, 30)):
        avatar, image, obs, _ = avatar_at(yaw, tint=0.7)
        memory.observe(avatar, image, obs, t_s=i / 30)
    atlas = memory.atlas
    before = memory.colours()[0, :3].clone()  # lit as the last darker frame
    avatar, image, obs, _ = avatar_at(0)
    lit = []
    for i in range(15):  # the ratio follows over frames (ratio_keep: smoothed against per-frame noise)
        memory.observe(avatar, image, obs, t_s=0.2 + i / 30)
        if i == 0:
            middle = memory.confidence.shape[0] // 2  # the layer of yaw 0, which the brighter frame went to
            texels = ~atlas.texel_card & (memory.confidence.amax(0) > 0.5) & (memory.confidence[middle] == 0)
            assert texels.sum() > 50  # the side of the head only the darker, turned frames saw
        lit.append(view_colours(memory, texels).mean().item())
    stored = before.reshape(3, -1)[:, atlas.texel_ids[texels]].mean().item()
    assert stored < lit[0] < lit[-1], f"memory {stored:.3f}, lit as now after 1 and 15 frames {lit[0]:.3f}, {lit[-1]:.3f}"
    assert lit[-1] > 1.15 * stored, f"memory {stored:.3f}, lit as now {lit[-1]:.3f}"


def test_the_ratio_is_smoothed_over_updates_and_starts_whole_after_a_reset():
    memory = AppearanceMemory(MemoryConfig(texels=32, ratio_keep=0.8))
    memory.update(avatar_at(0)[0])  # makes a ratio (against an empty memory)
    memory.reset()
    ones = torch.ones_like(memory._ratio)
    memory._set_ratio(2 * ones)  # the first since the reset: whole
    assert torch.allclose(memory._ratio, 2 * ones)
    memory._set_ratio(ones)  # then 20 % of each new one
    assert torch.allclose(memory._ratio, 1.8 * ones)
    memory.reset()
    assert torch.equal(memory._ratio, ones)
    memory._set_ratio(3 * ones)
    assert torch.allclose(memory._ratio, 3 * ones)


def test_atlas_layout_covers_the_head_and_card():
    atlas = memory_atlas((10, 28, False), 64, 16, "cpu")
    Ha, Wa = atlas.size
    assert Ha % 16 == 0 and Wa % 16 == 0
    assert atlas.texel_ids.unique().numel() == atlas.texel_ids.numel()
    assert (atlas.texel_bary.sum(-1) - 1).abs().max() < 1e-4
    assert atlas.texel_card.any() and (~atlas.texel_card).any()


def test_update_every_n_frames_skips_the_others():
    """update_every=2: the second frame's avatar reaches the renders (attached) but not the memory."""
    memory = AppearanceMemory(MemoryConfig(texels=32, update_every=2))
    memory.observe(avatar_at(0)[0], t_s=0.0)
    before = memory.colour.clone()
    avatar = avatar_at(45)[0]
    attached = memory.observe(avatar, t_s=1 / 30)
    assert torch.equal(memory.colour, before)
    assert attached.memory is memory.view
    memory.observe(avatar, t_s=2 / 30)
    assert not torch.equal(memory.colour, before)
    with pytest.raises(ValueError, match="update_every"):
        MemoryConfig(update_every=0)


def test_a_wider_pose_affinity_pools_the_neighbouring_layers():
    """affinity_deg: None is the layer step; wider, a render at one layer takes its neighbours more."""
    avatar = avatar_at(0)[0]

    def fed(**kw):  # the layers are laid out at the first frame
        memory = AppearanceMemory(MemoryConfig(texels=32, **kw))
        memory.observe(avatar, t_s=0.0)
        return memory

    same, step = fed(affinity_deg=7.5), fed(affinity_deg=None)
    assert torch.equal(same._affinity(3.0), step._affinity(3.0))  # noqa: SLF001
    fine = fed(affinity_deg=None)  # 13 layers 7.5 degrees apart (the defaults), pooled over one step
    pooled = fed()  # ... over 15 degrees
    a, b = fine._affinity(0.0)[:, 0], pooled._affinity(0.0)[:, 0]  # noqa: SLF001 - [K]; layer 6 is at 0
    assert a[6] == b[6] == 1.0 and b[5] > a[5] and b[4] > a[4]
    with pytest.raises(ValueError, match="affinity_deg"):
        MemoryConfig(affinity_deg=0.0)


def test_near_its_own_pose_the_frame_keeps_its_texture(turned):
    """Over the frame's own texture only on a mesh fitted over_from_deg or more from the frame's pose."""
    memory = turned[0]
    memory.look_from(memory._yaw_now)  # noqa: SLF001 - the newest frame's pose
    assert memory.view[0, 5].abs().max() == 0
    memory.look_from(memory._yaw_now + 40.0)  # noqa: SLF001 - a reenactment 40 degrees away
    assert memory.view[0, 5].max() > 0.5
    memory.look_from(memory._yaw_now)  # noqa: SLF001 - as the fixture left it


@pytest.mark.gpu
def test_feed_and_view_on_cuda_never_wait_for_the_device():
    """The memory's blend, lighting ratio and view queue device work only (no host sync): the head's yaw
    reaches the device as a kernel scalar, never as an upload."""

    memory = AppearanceMemory(MemoryConfig(texels=64), "cuda")
    avatar = build_avatar(*avatar_at(30)[1:3], device="cuda", render_size=128)
    memory.allocate(avatar.config)
    x, q = observe_texels(memory.atlas, avatar)
    memory.feed(x, q, 0.0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        memory.feed(x, q, 30.0)
        memory.look_from(10.0)
        memory.attach(avatar)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _half_seen(yaw_deg: float = 20.0):
    """An avatar whose memory saw the face's left half of the atlas (grey 0.6), with the memory attached, and its
    raster at yaw ``yaw_deg`` (128 px): the edge of what was seen lies in the view."""
    from models.geometry.camera import project
    from models.geometry.raster import rasterize

    avatar = avatar_at(0)[0]
    memory = AppearanceMemory(CONFIG)
    memory.allocate(avatar.config)
    atlas = memory.atlas
    x = torch.full((atlas.texel_ids.shape[0], 4), 0.6)
    x[:, 3] = 1.0
    memory.feed(x, (atlas.texel_ids % atlas.size[1] < CONFIG.texels // 2).float(), 0.0)
    viewmats, Ks = avatar.cameras([OrbitPose(yaw_deg=yaw_deg)], 128)
    frags = rasterize(project(avatar.verts[None], viewmats, Ks), avatar.faces, 128, 128, cull=avatar.cull,
                      skip=avatar.skip)
    return memory.attach(avatar), frags


def test_remembered_colour_does_not_darken_where_what_was_seen_ends():
    """Bilinear lookups beside texels the memory never saw keep the seen texels' colour (only the weights
    fade): a straight colour next to the zeros of unseen texels drew a dark line across the cheek."""
    from models.avatar.render import _sample_memory

    avatar, frags = _half_seen()
    sampled = _sample_memory(avatar, frags)[0]  # [6, S, S]
    fill = sampled[4]
    used = frags.mask[0] & (fill > 0.02)
    assert used.sum() > 200 and (used & (fill < 0.5)).sum() > 20  # the edge of what was seen is in the view
    assert (sampled[:3, used] - 0.6).abs().max() < 0.01


def test_where_the_memory_takes_over_is_a_ramp_within_what_it_saw():
    """Its weights are eroded softly over a band of pixels: where the memory starts (an earlier frame saw the surface,
    or saw it better) the render ramps into it instead of outlining a patch, and nowhere does it reach past what it saw."""
    from models.avatar.render import _memory_at, _memory_band, _Pixels

    avatar, frags = _half_seen()
    px = _Pixels.of(frags)
    step = _memory_at(avatar, px.face, px.bary)
    ramp = _memory_band(step, px)
    assert torch.equal(ramp[:, :4], step[:, :4]) and (ramp[:, 4:] <= step[:, 4:] + 1e-6).all()
    fill_step, fill_ramp = step[:, 4].reshape(-1), ramp[:, 4].reshape(-1)
    assert int((fill_step > 0.99).sum()) > 200 and int((fill_ramp > 0.99).sum()) > 50  # well inside: all of it
    between = lambda w: int(((w > 0.05) & (w < 0.95)).sum())  # noqa: E731
    assert between(fill_ramp) >= 3 * between(fill_step) > 0  # the edge: a band of pixels, not one or two


def _same_state(a, b, atol=1e-5):
    for name in ("colour", "confidence", "best", "view", "_ratio", "_q_now"):
        x, y = getattr(a, name), getattr(b, name)
        assert torch.allclose(x, y, atol=atol), f"{name}: max |diff| {float((x - y).abs().max())}"


@pytest.mark.gpu
def test_the_update_compiled_in_the_background_takes_over_from_the_plain_graph():
    """A sender's memory (compiler set): the plain graph serves while the worker compiles the update on a twin
    (this memory's state untouched), and the next update captures the compiled one in its place."""
    from models.avatar.compiling import BackgroundCompiler
    from models.avatar.engine import AvatarEngine

    engine = AvatarEngine(device="cuda", render_size=128)
    eager, graphed = AppearanceMemory(CONFIG, "cuda"), AppearanceMemory(CONFIG, "cuda")
    graphed.cuda_graphs, graphed.compiler = True, BackgroundCompiler("cuda")
    for i, yaw in enumerate(YAWS):
        _, image, obs, _ = avatar_at(yaw)
        avatar = engine.build(image, obs)
        eager.update(avatar, yaw)
        graphed.update(avatar, yaw)
        if i == 0:
            assert graphed.compiler.wait(600) and graphed.compiler.failed is None
            assert not any(g.compiled for g in graphed._graphs.values())
            _same_state(eager, graphed, atol=1e-4)  # the twin's compile left this memory as one plain update did
        else:
            _nearly_same_state(eager, graphed)
    assert graphed.cuda_graphs and any(g.compiled for g in graphed._graphs.values())


def _nearly_same_state(a, b):
    """Compiled kernels sum in another order and inductor's maths differ in the last bits, and an observation
    that lands within those bits of a texel's gate (0.9 x its best quality) counts in one memory and not in
    the other: on an H200 the largest colour difference after 8 frames was 1.7e-4 in one run and 1.8e-3 in
    the next (2026-11-30). So: nearly every value the same, none far off on average."""
    for name in ("colour", "confidence", "best", "view", "_ratio", "_q_now"):
        x, y = getattr(a, name).float(), getattr(b, name).float()
        diff = (x - y).abs()
        assert float((diff > 1e-3).float().mean()) < 0.005, f"{name}: {100 * float((diff > 1e-3).float().mean()):.2f} % off"
        assert float(diff.mean()) < 1e-4, f"{name}: mean |diff| {float(diff.mean())}"


YAWS = (0.0, 7.5, 22.5, -37.5, 60.0, 31.0, 7.5, -8.0)
"""Head yaws for the update paths: ties between two layers (7.5, 22.5), beyond the outer layers (60)."""


def test_the_update_a_cuda_graph_holds_is_the_eager_update():
    """update() with the yaw as a device tensor (what the sender's CUDA graph captures: the layer chosen and
    the affinity worked out on the device) gives the eager update's memory, frame after frame."""
    eager, tensor = AppearanceMemory(CONFIG), AppearanceMemory(CONFIG)
    for yaw in YAWS:
        avatar = avatar_at(yaw)[0]
        eager.update(avatar, yaw)
        tensor.allocate(avatar.config)
        tensor._yaw_now = yaw  # as the replay sets it on the host (later look_from calls)
        tensor._update_at(avatar, torch.tensor(yaw))
        _same_state(eager, tensor)
    assert float(eager.confidence.amax(1).gt(0).sum()) >= 4  # several layers were written


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True], ids=["plain", "compiled"])
def test_the_update_replays_as_a_cuda_graph_as_it_runs_eagerly(compiled):
    """With cuda_graphs the update is one replay per frame (compiled first, as a GPU sender does it); the capture
    (which runs it several times) leaves the memory as one update would, and the memory equals the eager one's
    after every frame."""
    from models.avatar.engine import AvatarEngine

    engine = AvatarEngine(device="cuda", render_size=128)
    eager, graphed = AppearanceMemory(CONFIG, "cuda"), AppearanceMemory(CONFIG, "cuda")
    graphed.cuda_graphs, graphed.compile_update = True, compiled
    for yaw in YAWS:
        _, image, obs, _ = avatar_at(yaw)
        avatar = engine.build(image, obs)  # the build graph's tensors: the same every frame
        eager.update(avatar, yaw)
        graphed.update(avatar, yaw)
        if compiled:
            _nearly_same_state(eager, graphed)
        else:
            _same_state(eager, graphed, atol=1e-4)
    assert graphed.cuda_graphs and len(graphed._graphs) >= 1  # no fall back to eager
    assert graphed.compile_update == compiled  # nor from the compiled update to the plain one
    assert len(graphed._graphs) <= engine.captures  # one per build plan, not one per frame


def test_a_sender_s_memory_pickles_without_its_machinery():
    """models.avatar.precompiled pickles the update's arguments for the guards it saves: a sender's memory (its
    compiler holds a lock, its identity a model) pickles as settings and buffers alone; its copies (the twin
    the background compile updates) share the buffers until replaced."""
    import copy
    import pickle

    from models.avatar.compiling import BackgroundCompiler

    memory = AppearanceMemory(CONFIG, identity=lambda image, obs: None)
    memory.compiler = BackgroundCompiler(torch.device("cpu"))
    avatar = avatar_at(30)[0]
    memory.update(avatar, 30.0)
    again = pickle.loads(pickle.dumps(memory))
    assert again.compiler is None and again.identity is None and again._graphs == {}
    _same_state(memory, again, atol=0)
    twin = copy.copy(memory)
    assert twin.colour is memory.colour and twin.compiler is None and memory.compiler is not None


@pytest.mark.skipif(not precompiled.supported(), reason="needs torch.compiler.load_compiled_function (torch 2.9+)")
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_the_update_is_saved_whole_and_a_later_sender_loads_it(tmp_path, device):
    """--precompiled-avatar's store serves the memory's update (a method of an object with a lock among its
    members: it fell back to torch.compile on an H200, 2026-12-01): saved by one store, loaded by the next, and
    the loaded update writes the live memory's buffers as the eager update does."""
    from models.avatar.compiling import BackgroundCompiler
    from models.avatar.precompiled import PrecompiledStore

    def sender_memory():
        memory = AppearanceMemory(CONFIG, device)
        memory.compiler = BackgroundCompiler(torch.device(device))
        return memory

    def built(yaw):
        image, obs, _ = turning_head_frame(yaw)
        return build_avatar(image, obs, device=device, render_size=128)

    avatars = [(built(yaw), yaw) for yaw in (0.0, 22.5, -37.5)]
    eager, first, second = AppearanceMemory(CONFIG, device), sender_memory(), sender_memory()
    saving, loading = PrecompiledStore(tmp_path), PrecompiledStore(tmp_path)
    updates = ((first, saving(AppearanceMemory._update_at)), (second, loading(AppearanceMemory._update_at)))
    for avatar, yaw in avatars:
        eager.update(avatar, yaw)
        for memory, update in updates:
            memory.allocate(avatar.config)
            memory._yaw_now = yaw
            update(memory, avatar, torch.tensor(yaw, device=device))
        _same_state(first, second, atol=0)  # the saved kernels, loaded: the same sums in the same order
        _nearly_same_state(eager, second)  # inductor's kernels sum in another order than the eager ops
    assert saving.saved == 1 and not saving.fell_back
    assert loading.loaded == 1 and loading.saved == 0 and not loading.fell_back
