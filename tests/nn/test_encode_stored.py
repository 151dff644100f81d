"""FrameEncoder.encode_stored: the one place where the backbone's precision and the stored dtype are applied."""
import pytest
import torch

from pipeline.nn.backbone import FrameEncoder


@pytest.fixture(scope="module")
def encoder():
    return FrameEncoder("test_resnet", weights="none")


def test_features_are_rounded_through_the_stored_dtype(encoder):
    x = torch.randn(5, 3, 64, 64)
    plain = encoder.encode(x)  # float32 (5, D)
    stored = encoder.encode_stored(x, "32", "float16", batch_size=2)
    assert stored.dtype == torch.float32 and stored.shape == (5, encoder.num_features)
    torch.testing.assert_close(stored, plain.half().float(), rtol=0, atol=0)
    torch.testing.assert_close(encoder.encode_stored(x, "32", "float32"), plain, rtol=0, atol=0)
    bf16 = encoder.encode_stored(x, "bf16", "float32")  # autocast on the input's device
    assert not torch.equal(bf16, plain) and torch.allclose(bf16, plain, rtol=0.1, atol=0.1)


def test_unknown_precision_or_dtype(encoder):
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="precision '64'"):
        encoder.encode_stored(x, "64")
    with pytest.raises(ValueError, match="stored dtype 'int8'"):
        encoder.encode_stored(x, "32", "int8")
