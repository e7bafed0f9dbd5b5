"""The one-shot 3D head avatar: build from one frame and its face analysis, render at any camera."""
from models.avatar.core import Avatar, AvatarConfig, RenderOutput, build_avatar, crop_box, render_cameras, render_views
from models.avatar.engine import AvatarEngine

__all__ = ["Avatar", "AvatarConfig", "AvatarEngine", "RenderOutput", "build_avatar", "crop_box", "render_cameras", "render_views"]
