import numpy as np
import pytest

from models.face.native_log import NATIVE_NOISE

from models.face.analysis import (
    FaceAnalyzer,
    FaceConfig,
    ImageReadError,
    NoFaceError,
    face_model,
    face_oval_mask,
    head_region_mask,
    read_image,
)


def test_landmarks_pose_and_mask_on_astronaut(analyzer, astronaut):
    obs = analyzer.analyze(astronaut)
    assert obs.landmarks_px.shape == (478, 3)
    assert obs.points_cam.shape == (478, 3)
    assert obs.mask.shape == astronaut.shape[:2] and 0.2 < obs.mask.mean() < 0.9
    # Frontal portrait: small yaw, the head a metre or two away, a tight rigid fit.
    assert abs(obs.pose.yaw_deg) < 10
    assert 0.5 < obs.pose.translation[2] < 3.0
    assert obs.pose.fit_rmse_m < 0.01
    # Eyes where they are in the picture (subject's right eye on the picture's left).
    assert obs.landmarks_px[33, 0] < obs.landmarks_px[263, 0]
    assert 40 < obs.iod_px < 120


def test_head_yaw_sign_follows_the_orbit_convention(analyzer, test_data):
    # lp_s10 (Vermeer) turns to show her left cheek: like a camera orbiting to the viewer's right.
    obs = analyzer.analyze(read_image(test_data / "lp_s10.jpg"))
    assert obs.pose.yaw_deg > 15


def test_largest_face_wins(analyzer, test_data):
    import cv2

    face = read_image(test_data / "lp_s42.jpg")
    canvas = np.full((512, 512, 3), 128, np.uint8)
    canvas[128:384, :256] = cv2.resize(face, (256, 256))  # larger copy on the left
    canvas[156:356, 312:512] = cv2.resize(face, (200, 200))  # smaller copy on the right
    # MediaPipe finds both (and lists the small one first); the large one must win.
    assert len(analyzer._mesh.process(canvas).multi_face_landmarks) == 2
    obs = analyzer.analyze(canvas)
    assert obs.landmarks_px[:, 0].mean() < 256


def test_no_face_is_a_clear_error(analyzer, test_data):
    dog = read_image(test_data / "lp_s33.jpg")
    with pytest.raises(NoFaceError, match="no face"):
        analyzer.analyze(dog)


def test_unreadable_files_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    with pytest.raises(ImageReadError, match="not an image file, or corrupt"):
        read_image(bad)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageReadError):
        read_image(empty)
    with pytest.raises(ImageReadError, match="no such file"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(ImageReadError, match="directory"):
        read_image(tmp_path)


def test_a_gif_gives_its_first_frame_and_heic_says_what_it_is(tmp_path, astronaut):
    from PIL import Image

    first, second = astronaut, np.ascontiguousarray(astronaut[::-1])
    Image.fromarray(first).save(tmp_path / "face.gif", save_all=True, append_images=[Image.fromarray(second)])
    image = read_image(tmp_path / "face.gif")  # OpenCV's imdecode returns None for any GIF
    assert image.shape == astronaut.shape and image.dtype == np.uint8
    # GIF keeps 256 colours: the frame is near the first picture, far from the second (upside down)
    assert np.abs(image.astype(int) - first).mean() < 12 < np.abs(image.astype(int) - second).mean()
    heic = tmp_path / "phone.heic"
    heic.write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64))
    with pytest.raises(ImageReadError, match="HEIC pictures are not supported .convert it to JPEG or PNG."):
        read_image(heic)


def test_transparent_pixels_are_laid_over_white_and_a_strip_too_narrow_to_fit_is_refused(tmp_path):
    import cv2

    bgra = np.zeros((40, 40, 4), np.uint8)
    bgra[..., 1] = 255  # a green screen's colour under the transparent pixels
    bgra[10:30, 10:30] = (0, 0, 255, 255)  # an opaque red square
    bgra[0, 20, 3] = 128  # half transparent
    cv2.imwrite(str(tmp_path / "cut_out.png"), bgra)
    rgb = read_image(tmp_path / "cut_out.png")
    assert (rgb[0, 0] == 255).all() and (rgb[20, 20] == (255, 0, 0)).all()
    assert np.abs(rgb[0, 20].astype(int) - (128, 255, 128)).max() <= 1  # green at half over white
    cv2.imwrite(str(tmp_path / "opaque.png"), np.dstack([np.full((40, 40, 3), 90, np.uint8), np.full((40, 40), 255, np.uint8)]))
    assert (read_image(tmp_path / "opaque.png") == 90).all()
    cv2.imwrite(str(tmp_path / "strip.png"), np.zeros((20, 4000, 3), np.uint8))  # 16 px and more before the cap
    with pytest.raises(ImageReadError, match=r"4000x20 pixels is too narrow .* leaves 10 px"):
        read_image(tmp_path / "strip.png", min_side=16, max_side=1920)


def test_bad_arrays_are_rejected(analyzer):
    with pytest.raises(ValueError, match="expected an RGB uint8 image"):
        analyzer.analyze(np.zeros((64, 64), np.uint8))
    with pytest.raises(ValueError, match="expected an RGB uint8 image"):
        analyzer.analyze(np.zeros((64, 64, 3), np.float32))


def test_face_model_and_masks(analyzer, astronaut):
    model = face_model()
    assert model.vertices.shape == (468, 3) and model.triangles.shape == (898, 3)
    assert len(model.face_oval) == 36
    obs = analyzer.analyze(astronaut)
    oval = face_oval_mask(obs.landmarks_px, obs.image_size)
    head = head_region_mask(obs.landmarks_px, obs.image_size, obs.mask)
    assert oval.sum() > 1000
    # The head region reaches above the face (hair) but stays inside the person.
    assert head.sum() > oval.sum() * 1.1
    assert np.argmax(head.any(1)) < np.argmax(oval.any(1))
    assert (head * (obs.mask <= 0.5)).sum() == 0


def test_config_validates():
    with pytest.raises(ValueError, match="max_faces"):
        FaceConfig(max_faces=0)


def test_a_video_analyzer_keeps_mediapipes_native_chatter_off_stderr(capfd):
    # MediaPipe opens a video graph's models on its own threads some time after the graph is made,
    # writing TFLite/absl lines straight to file descriptor 2: they must not reach a user's terminal.
    import time

    capfd.readouterr()
    with FaceAnalyzer(FaceConfig(static_image=False)):
        time.sleep(1.5)  # the models open within about a second (measured: 1.1 s in the demo)
    err = capfd.readouterr().err
    assert not [line for line in err.splitlines() if NATIVE_NOISE.match(line)], err
