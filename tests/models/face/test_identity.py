"""The torch port of dlib's face-recognition network and alignment, against dlib itself."""
import numpy as np
import pytest
import torch

from models.face.identity import (
    EMBEDDING_FILE,
    MissingEvalExtraError,
    align_faces,
    face_descriptors,
    five_points_from_mediapipe,
    load_face_net,
    model_dir,
)
from models.face.identity_net import DlibFormatError, FaceRecognitionNet, read_dlib_net


@pytest.fixture(scope="module")
def weights_path():
    try:
        return model_dir() / EMBEDDING_FILE
    except MissingEvalExtraError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def face_net(weights_path):
    return load_face_net(weights_path.parent)


@pytest.fixture(scope="module")
def faces(test_data, astronaut, weights_path):
    """23 faces from the repository alone (7 stills, 8 head-turn frames, 8 frames of the sample
    clip), each with dlib's own results: (RGB uint8 picture, 5 points [5, 2],
    compute_face_descriptor [128], get_face_chip [150, 150, 3])."""
    dlib = pytest.importorskip("dlib", reason="the reference is dlib itself (the eval extra)")
    import cv2

    from models.face.analysis import read_image

    pictures = [astronaut] + [read_image(p) for p in sorted(test_data.glob("lp_*.jpg")) if p.stem != "lp_s33"]
    clip = cv2.VideoCapture(str(test_data.parents[1] / "telepresence" / "assets" / "sample.mp4"))
    for i in range(141):
        ok, frame = clip.read()
        assert ok
        if i % 20 == 0:
            pictures.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(weights_path.parent / "shape_predictor_5_face_landmarks.dat"))
    net = dlib.face_recognition_model_v1(str(weights_path))
    out = []
    for img in pictures:
        boxes = detector(img, 0) or detector(img, 1)  # the faces are large: no upsampling needed, mostly
        shape = predictor(img, max(boxes, key=lambda b: b.area()))
        points = np.array([[shape.part(i).x, shape.part(i).y] for i in range(5)], np.float64)
        out.append((img, points, np.asarray(net.compute_face_descriptor(img, shape)), dlib.get_face_chip(img, shape, 150, 0.25)))
    return out


def cosine_distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(1.0 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def as_tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255.0


def test_reader_finds_the_resnet_layers(weights_path):
    net = read_dlib_net(weights_path)
    names = [layer.name for layer in net.layers]
    assert net.input_size == (150, 150)
    assert names.count("con") == 29 and names.count("affine") == 29 and names[-1] == "fc"
    assert net.layers[-1].ints == {"num_outputs": 128, "num_inputs": 256, "bias_mode": 1}
    assert net.mean_rgb == pytest.approx((122.782, 117.001, 104.298), abs=1e-3)


def test_reader_rejects_other_files(tmp_path, weights_path):
    bad = tmp_path / "other.dat"
    bad.write_bytes(weights_path.read_bytes()[:1000])
    with pytest.raises(DlibFormatError, match="more bytes"):
        read_dlib_net(bad)
    shape_model = weights_path.parent / "shape_predictor_5_face_landmarks.dat"
    with pytest.raises(DlibFormatError, match="loss_metric"):
        FaceRecognitionNet.from_dlib(shape_model)


def test_network_matches_dlib_on_its_own_chips(faces, face_net, one_thread):
    chips = torch.cat([as_tensor(chip) for *_, chip in faces])
    with torch.no_grad():
        ours = face_net(chips).double().numpy()
    for (_, _, ref, _), got in zip(faces, ours):
        assert cosine_distance(got, ref) < 1e-6
        assert np.abs(got - ref).max() < 1e-5


def test_alignment_reproduces_dlibs_chips(faces):
    for img, points, _, chip in faces[::4]:
        ours = align_faces(as_tensor(img), torch.from_numpy(points)[None])[0].permute(1, 2, 0).numpy() * 255.0
        diff = ours - chip  # dlib truncates to uint8 (after each pyramid level too); this port does not
        assert diff.min() > -1e-3 and diff.max() < 2.0
        assert 0.3 < diff.mean() < 0.6


def test_descriptors_match_dlib_compute_face_descriptor(faces, face_net, one_thread):
    assert len(faces) >= 20
    by_size: dict[tuple, list] = {}
    for img, points, ref, _ in faces:  # one batch per picture size
        by_size.setdefault(img.shape, []).append((img, points, ref))
    distances = []
    with torch.no_grad():
        for group in by_size.values():
            images = torch.cat([as_tensor(img) for img, _, _ in group])
            points = torch.from_numpy(np.stack([p for _, p, _ in group]))
            got = face_descriptors(face_net, images, points).double().numpy()
            distances += [cosine_distance(g, ref) for g, (_, _, ref) in zip(got, group)]
    assert max(len(g) for g in by_size.values()) >= 8
    assert len(distances) == len(faces) and max(distances) < 1e-3, distances


def test_alignment_is_differentiable(face_net, astronaut, one_thread):
    image = as_tensor(astronaut).requires_grad_(True)
    points = torch.tensor([[[255.0, 104.0], [238.0, 105.0], [195.0, 101.0], [212.0, 103.0], [224.0, 135.0]]])  # dlib's
    target = torch.zeros(1, 128)
    loss = (face_descriptors(face_net, image, points) - target).norm()
    loss.backward()
    g = image.grad[0].abs().sum(0)
    assert torch.isfinite(image.grad).all() and g.sum() > 0
    # it reaches the whole chip (about 2 inter-ocular distances wide about the 5 points) and nothing else
    rows, cols = (g > 0).nonzero().T
    (cx, cy), iod = points[0].mean(0), float(points[0, 0, 0] - points[0, 2, 0])
    for lo, hi, c in ((cols.min(), cols.max(), cx), (rows.min(), rows.max(), cy)):
        assert c - 1.6 * iod < lo < c - 0.6 * iod and c + 0.6 * iod < hi < c + 1.6 * iod


def test_mediapipe_points_land_on_dlibs(faces, analyzer):
    img, points, _, _ = faces[0]  # the astronaut
    mp = five_points_from_mediapipe(analyzer.landmarks(img))
    iod = np.linalg.norm(points[0] - points[2])
    assert mp.shape == (5, 2)
    assert np.linalg.norm(mp - points, axis=1).max() < 0.06 * iod


def test_embedder_torch_backend_matches_dlib(faces, one_thread):
    from models.face.identity import IdentityEmbedder, identity_distance

    ours, ref = IdentityEmbedder(backend="torch"), IdentityEmbedder()
    face, other = faces[1][0], faces[0][0]  # two people, 512 x 512 pictures
    box = ref.crop_box(other)
    assert identity_distance(ours.embed(other, box=box), ref.embed(other, box=box)) < 0.02
    # pictures as tensors [3, H, W] in [0, 1], each pair seen through the target's face box
    as_chw = [torch.from_numpy(p).permute(2, 0, 1).float() / 255 for p in (face, other)]
    expected = identity_distance(ref.embed(face, box=box), ref.embed(other, box=box))
    assert ours.batch_distance(as_chw[:1], as_chw[1:]) == pytest.approx([expected], abs=0.02)
