"""The one-shot 3D head avatar: build from one frame and its face analysis, render at any camera
(the GP-Avatar stage of the method).

From one picture and its face analysis we build, in one feed-forward pass, a
textured mesh of fixed topology, made of four parts (all in the source camera
frame, metres; see models.geometry.camera for the convention):

1. **face**: MediaPipe's 468-vertex face mesh, lifted to metric 3D
   (models.face.analysis.metric_landmarks);
2. **shell**: rings of vertices swept from the face outline over a cranium
   ellipsoid to a pole at the back of the head (hair, cranium, ears, under the
   jaw), grown to the person's silhouette above and beside the head (hair volume)
   and shrunk inside it elsewhere; ring 0 *is* the face outline, so face and shell
   share vertices and a turned head cannot tear at the jaw line or the forehead;
3. **card**: a curved sheet behind the head spanning the framed picture:
   neck and shoulders below the chin, a backdrop for the hair's soft edge; parts
   hidden by the head in the source take the colour of the nearest visible card
   point, so no ghost of the face appears behind a turned head, and the card fades
   out at the picture's edge;
4. **far layer** (``background="far"``): a distant plane carrying the
   background with the person painted out; with ``background="remove"`` the
   person mask becomes the alpha and the background a flat colour.

Texture is projective: each vertex carries its homogeneous position in the
texture frame's camera, interpolated perspective-correctly per pixel, so a
render at the source camera reproduces the source picture. The texture is the
picture with a matte at the person's edge (background unmixed, green-screen spill
removed), premultiplied. Where the source saw the surface badly (hidden, or seen so
edge-on that the view would stretch it into a streak) the head takes its mirror side's
texture through the face mesh's left/right pairs, lit by a low-frequency ratio, or a
fill colour spread from where it saw well, blended across a band. Vertex i means
the same point of the head in every frame, which gives **reenactment**:
geometry from frame t, texture from frame s (``build_avatar(..., geometry=obs_t)``).

Every view is rendered through a square **crop camera**: the source camera
with intrinsics framing the head (``crop_scale`` face heights wide). Orbit
views turn that camera about the head centre (the pivot).

Files, in import order: topology (the mesh's fixed part), types (AvatarConfig, Avatar,
RenderOutput), plan (the host's share of a build: framing and the fixed-shape plan),
geometry (vertex positions), visibility (the source-view depth map), texture, build,
render, and engine (AvatarEngine: the same build and render as CUDA graphs).
"""
from models.avatar.build import build_avatar
from models.avatar.engine import AvatarEngine
from models.avatar.plan import crop_box
from models.avatar.render import render_cameras, render_views
from models.avatar.types import Avatar, AvatarConfig, RenderOutput

__all__ = ["Avatar", "AvatarConfig", "AvatarEngine", "RenderOutput", "build_avatar", "crop_box", "render_cameras",
           "render_views"]
