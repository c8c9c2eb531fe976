import pytest
import torch
import torchvision

from moco_core.encoders import SUPPORTED_ARCHS, Encoder, build_backbone


def test_supported_archs_cover_the_resnet_family():
    for name in ("resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2"):
        assert name in SUPPORTED_ARCHS


@pytest.mark.parametrize("small_image_stem,size", [(True, 32), (False, 64)])
def test_encoder_output_is_unit_norm_with_configured_dim(small_image_stem, size):
    encoder = Encoder("resnet18", head="mlp", dim=32, small_image_stem=small_image_stem).eval()
    out = encoder(torch.randn(2, 3, size, size))
    assert out.shape == (2, 32)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))
    assert encoder.features(torch.randn(2, 3, size, size)).shape == (2, 512)


def test_small_image_stem_keeps_resolution():
    backbone, _ = build_backbone("resnet18", small_image_stem=True)
    assert backbone.conv1.kernel_size == (3, 3) and backbone.conv1.stride == (1, 1)
    assert isinstance(backbone.maxpool, torch.nn.Identity)


def test_heads():
    linear = Encoder("resnet18", head="linear", dim=16)
    mlp = Encoder("resnet18", head="mlp", dim=16)
    assert isinstance(linear.head, torch.nn.Linear)
    assert [type(m).__name__ for m in mlp.head] == ["Linear", "ReLU", "Linear"]
    assert mlp.head[0].out_features == 512
    with pytest.raises(ValueError, match="projection head"):
        Encoder("resnet18", head="conv")  # type: ignore[arg-type]


def test_backbone_weights_load_into_stock_torchvision_model():
    encoder = Encoder("resnet18")
    stock = torchvision.models.resnet18()
    missing, unexpected = stock.load_state_dict(encoder.backbone.state_dict(), strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected


def test_unknown_arch_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown arch 'vgg16'"):
        build_backbone("vgg16")
