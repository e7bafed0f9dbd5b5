"""The face-prior losses (dlib's face network) on tiny inputs, and their wiring into the trainer."""
import math

import pytest
import torch

from models.face.identity_net import FaceRecognitionNet
from models.training import losses


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return FaceRecognitionNet()  # random weights: the losses' maths, not dlib's numbers (tests/models/face)


def _images(seed: int, n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("which", [0, 1])  # identity, features
def test_face_prior_losses_are_zero_on_the_target_and_train_the_prediction_only(net, which):
    x, y = _images(1), _images(2)
    same = losses.face_prior_losses(net, x, x)[which].item()
    assert same == pytest.approx(math.sqrt(1e-8) if which == 0 else 0.0, abs=1e-7)
    x.requires_grad_(True)
    y.requires_grad_(True)
    value = losses.face_prior_losses(net, x, y)[which]
    assert value.item() > 10 * same + 1e-5
    value.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0 and y.grad is None


def test_identity_and_feature_losses_are_the_two_halves(net):
    x, y = _images(3), _images(4)
    ident, feats = losses.face_prior_losses(net, x, y)
    assert losses.identity_loss(net, x, y).item() == pytest.approx(ident.item(), rel=1e-6)
    assert losses.face_feature_loss(net, x, y).item() == pytest.approx(feats.item(), rel=1e-6)


def test_face_prior_losses_take_the_targets_points(net):
    x, y = _images(5), _images(6)
    pts = torch.tensor(losses.AVATAR_FIVE_POINTS, dtype=torch.float64) * 32
    default = losses.face_prior_losses(net, x, y)[0]
    given = losses.face_prior_losses(net, x, y, pts.expand(2, 5, 2))[0]
    assert given.item() == pytest.approx(default.item(), rel=1e-6)
    moved = losses.face_prior_losses(net, x, y, (pts + 3.0).expand(2, 5, 2))[0]
    assert moved.item() != pytest.approx(default.item(), rel=1e-3)
    with pytest.raises(ValueError, match=r"points \(2, 5, 2\)"):
        losses.face_prior_losses(net, x, y, pts[None])


def test_trainer_adds_the_face_losses_when_asked(tmp_path):
    from models.face.identity import MissingEvalExtraError, model_dir
    from models.training.data import TensorPairDataset, synthetic_pairs
    from models.training.families import build_refiner
    from models.training.trainer import TrainConfig, Trainer

    try:
        model_dir()
    except MissingEvalExtraError as exc:
        pytest.skip(str(exc))
    assert TrainConfig().identity_weight == 0.0 and TrainConfig().face_feature_weight == 0.0
    config = TrainConfig(model_preset="tiny", resolution=32, batch_size=1, stage1_steps=1, warmup_steps=0, gan_weight=0.0,
                         noise_max=0.0, num_workers=0, log_every=1, image_every=0, ckpt_every=0, progress=False,
                         identity_metric=False, identity_weight=0.1, face_feature_weight=0.1)
    torch.manual_seed(0)
    trainer = Trainer(build_refiner(config), config, tmp_path / "run", TensorPairDataset.from_samples(synthetic_pairs(1, 32)))
    logs = trainer.train_step()
    assert logs["id"] > 0 and logs["face_fm"] > 0
    assert logs["loss"] == pytest.approx(logs["l2"] + 0.5 * logs["ssim"] + 0.1 * (logs["id"] + logs["face_fm"]), rel=1e-4)
    with pytest.raises(ValueError, match="identity_weight"):
        TrainConfig(identity_weight=-1.0)
