import pytest
import torch

from gradleak.errors import UserError
from gradleak.models import ARCHS, build, has_batch_norm


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("size", [16, 32, 64, 128])
def test_every_arch_forwards_grey_images(arch, size):
    model = build(arch, num_classes=2, in_channels=1, image_size=size, seed=0)
    out = model(torch.rand(2, 1, size, size))
    assert out.shape == (2, 2)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("arch", ["resnet18", "resnet18_nobn"])
def test_resnet_large_input_stem(arch):
    model = build(arch, 3, 1, 128, seed=0).eval()
    assert isinstance(model.stem[-1], torch.nn.MaxPool2d)  # ImageNet stem above 64 px
    assert model(torch.rand(1, 1, 128, 128)).shape == (1, 3)
    small = build(arch, 3, 1, 32, seed=0)
    assert small.stem[0].kernel_size == (3, 3) and not isinstance(small.stem[-1], torch.nn.MaxPool2d)


def test_lenet5_matches_rog_layout():
    m = build("lenet5", 2, 1, 64)
    assert m.conv1.out_channels == 32 and m.conv1.kernel_size == (5, 5)
    assert m.conv2.out_channels == 64
    assert m.fc1.out_features == 512 and m.fc1.bias is None
    assert m.classifier.bias is None and m.classifier.out_features == 2


def test_lenet5_leaky_input_is_the_relu_of_its_preactivation():
    m = build("lenet5", 2, 1, 16)
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 4 - 2
    u = m.leaky_preactivation(x)
    assert bool((u < 0).any()) and bool((u > 0).any())
    assert torch.equal(m.leaky_input(x), torch.relu(u))  # max pooling and ReLU commute, bit for bit


def test_mlp_s_first_layer_reads_the_pixels_as_stored():
    m = build("mlp", 2, 1, 16, seed=0)
    img = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    x = (img - m.input_mean) / m.input_std  # what every victim's layers receive
    assert torch.allclose(m.leaky_input(x), img.flatten(1), atol=1e-6)
    assert bool((m.leaky_input(x) >= 0).all())  # non-negative, as a ReLU's output is
    assert torch.allclose(m(img), m.classifier(torch.relu(m.fc1(img.flatten(1)))), atol=1e-6)
    assert m.fc1.bias is None and m.classifier.bias is None
    assert (m.fc1.in_features, m.fc1.out_features) == (256, 512)
    assert build("mlp", 2, 3, 8, options={"width": 64}).fc1.weight.shape == (64, 192)


def test_lenet_zhu_is_sigmoid_three_convs():
    m = build("lenet_zhu", 10, 1, 32)
    convs = [l for l in m.body if isinstance(l, torch.nn.Conv2d)]
    assert [c.stride[0] for c in convs] == [2, 2, 1]
    assert all(c.out_channels == 12 for c in convs)
    assert sum(isinstance(l, torch.nn.Sigmoid) for l in m.body) == 3


def test_seeded_init_is_reproducible_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build("convnet", 2, 1, 32, seed=7)
    after = torch.rand(1)
    b = build("convnet", 2, 1, 32, seed=7)
    c = build("convnet", 2, 1, 32, seed=8)
    assert before.item() == after.item()
    for (n, x), (_, y), (_, z) in zip(a.state_dict().items(), b.state_dict().items(), c.state_dict().items()):
        assert torch.equal(x, y), n
    assert any(not torch.equal(x, z) for x, z in zip(a.state_dict().values(), c.state_dict().values()))


def test_normalisation_is_not_part_of_the_state():
    m = build("lenet5", 2, 1, 32, mean=[0.3], std=[0.2])
    assert not any("input_" in k for k in m.state_dict())
    x = torch.rand(1, 1, 32, 32)
    ref = build("lenet5", 2, 1, 32, seed=0, mean=[0.0], std=[1.0])
    ref.load_state_dict(build("lenet5", 2, 1, 32, seed=0).state_dict())
    m2 = build("lenet5", 2, 1, 32, seed=0, mean=[0.3], std=[0.2])
    assert torch.allclose(m2(x), ref((x - 0.3) / 0.2), atol=1e-5)


def test_batch_norm_detection():
    assert has_batch_norm(build("resnet18", 2, 1, 32))
    assert not has_batch_norm(build("resnet18_nobn", 2, 1, 32))
    assert not has_batch_norm(build("lenet5", 2, 1, 32))


def test_bad_arch_and_size_are_user_errors():
    with pytest.raises(UserError, match="did you mean 'lenet5'"):
        build("lenet6")
    with pytest.raises(UserError, match="divisible by 4"):
        build("lenet5", image_size=30)
