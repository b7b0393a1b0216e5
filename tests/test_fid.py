"""fmjax.metrics.fid, .inception and .frechet, and experiments.fid: closed forms, the resize, the
converter, the Inception port against a PyTorch reference, reference statistics and FID of a
sampler.

Inception at 299 x 299 costs ~6 GFLOP an image on CPU, so every test that runs it feeds the same
8 small images (one per CPU device) through one compiled program, shared by a module-scoped
fixture; other weights reuse that program, as weights are arguments. The PyTorch tests need
``torch`` (the CPU build is enough) and skip without it.
"""

import math

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments import fid as fid_command
from fmjax.data import TfdsSource
from fmjax.mesh import make_mesh
from fmjax.metrics import fid
from fmjax.metrics import inception as fid_inception
from fmjax.metrics.frechet import frechet_distance, gaussian_statistics

N_IMAGES = 8  # one per CPU device of conftest


# --- Fréchet distance -------------------------------------------------------------------------


def _random_rotation(rng, d):
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def test_frechet_diagonal_closed_form():
    # N(m1, diag(a)) vs N(m2, diag(b)): |m1 - m2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(5), rng.standard_normal(5)
    a, b = rng.uniform(0.1, 3.0, 5), rng.uniform(0.1, 3.0, 5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_commuting_closed_form():
    # Covariances sharing eigenvectors commute: the same formula holds with their eigenvalues.
    rng = np.random.default_rng(1)
    d = 16
    q = _random_rotation(rng, d)
    a, b = rng.uniform(0.05, 2.0, d), rng.uniform(0.05, 2.0, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    got = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert got == pytest.approx(expected, rel=1e-9)


def _sqrtm_frechet(mu1, s1, mu2, s2, offset=0.0):
    """pytorch-fid's formula: scipy's sqrtm of the (optionally offset) product."""
    from scipy import linalg

    eye = offset * np.eye(len(s1))
    covmean = linalg.sqrtm((s1 + eye) @ (s2 + eye)).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_general_equals_the_sqrtm_formula():
    rng = np.random.default_rng(2)
    d = 32
    f1, f2 = rng.standard_normal((200, d)), rng.standard_normal((300, d)) @ rng.normal(size=(d, d))
    s1, s2 = (gaussian_statistics(f) for f in (f1, f2))
    got = frechet_distance(*s1, *s2)
    assert got == pytest.approx(_sqrtm_frechet(*s1, *s2), rel=1e-9)
    assert got == pytest.approx(frechet_distance(*s2, *s1), rel=1e-9)


def test_frechet_rank_deficient_is_exact_and_stable():
    # Fewer samples than dimensions: both covariances are singular (rank 9 of 64), the product
    # too; the result stays finite, real, symmetric, and near pytorch-fid's offset answer.
    rng = np.random.default_rng(3)
    d = 64
    s1 = gaussian_statistics(rng.standard_normal((10, d)))
    s2 = gaussian_statistics(rng.standard_normal((10, d)) + 0.5)
    assert np.linalg.matrix_rank(s1[1]) < d
    got = frechet_distance(*s1, *s2)
    assert math.isfinite(got)
    assert got == pytest.approx(frechet_distance(*s2, *s1), rel=1e-7)
    assert got == pytest.approx(_sqrtm_frechet(*s1, *s2, offset=1e-6), rel=1e-4)
    # A singular covariance against itself: zero up to round-off, which the square roots
    # raise to ~sqrt(1e-16) per null direction (pytorch-fid's offset allowed 2e-6 * d).
    assert abs(frechet_distance(*s1, *s1)) < 1e-6 * np.trace(s1[1])


def test_frechet_rejects_covariances_that_are_not_psd():
    with pytest.raises(ValueError, match="sigma2 must be a finite symmetric covariance"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.array([[1.0, 0.5], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="sigma1 must be positive semi-definite"):
        frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match=r"sigma2 .* must be positive semi-definite"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.diag([1.0, -1.0]))


def test_frechet_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="means of shape"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


# --- preprocessing ----------------------------------------------------------------------------


def test_resize_hand_computed():
    # Up 2 -> 4: samples at max(0, (i + 1/2) / 2 - 1/2) = 0, 0.25, 0.75, 1.25 (clamped to 1).
    a, b = 1.0, 5.0
    x = np.array([a, b], np.float32).reshape(1, 1, 2, 1)
    up = np.asarray(fid.resize_bilinear(x, (1, 4)))[0, 0, :, 0]
    np.testing.assert_allclose(up, [a, 0.75 * a + 0.25 * b, 0.25 * a + 0.75 * b, b], rtol=1e-6)
    # Down 4 -> 2: samples at 0.5 and 2.5, midpoints of pixel pairs (no antialiasing).
    x = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
    down = np.asarray(fid.resize_bilinear(x, 2))[0, :, :, 0]
    np.testing.assert_allclose(down, [[2.5, 4.5], [10.5, 12.5]], rtol=1e-6)
    # Same size: the identity.
    np.testing.assert_array_equal(fid.resize_bilinear(x, 4), x)


@pytest.mark.parametrize(("shape", "size"), [((2, 32, 32, 3), 299), ((1, 40, 23, 2), (17, 31))])
def test_resize_matches_torch(shape, size):
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).uniform(0, 1, shape).astype(np.float32)
    out_size = (size, size) if isinstance(size, int) else size
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(x).permute(0, 3, 1, 2), size=out_size, mode="bilinear", align_corners=False
    )
    got = np.asarray(fid.resize_bilinear(x, size))
    np.testing.assert_allclose(got, ref.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-6)


def test_resize_tf1_hand_computed():
    # TF1's grid: output pixel i samples i * in / out. Up 2 -> 4: 0, 0.5, 1, 1.5 (clamped to 1).
    a, b = 1.0, 5.0
    x = np.array([a, b], np.float32).reshape(1, 1, 2, 1)
    up = np.asarray(fid.resize_bilinear(x, (1, 4), half_pixel_centers=False))[0, 0, :, 0]
    np.testing.assert_allclose(up, [a, 0.5 * (a + b), b, b], rtol=1e-6)
    # Down 4 -> 2: samples at 0 and 2, i.e. pixels themselves (the top-left anchored grid).
    x = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
    down = np.asarray(fid.resize_bilinear(x, 2, half_pixel_centers=False))[0, :, :, 0]
    np.testing.assert_array_equal(down, [[0.0, 2.0], [8.0, 10.0]])


def _torch_inception_inputs(torch, images_uint8_nhwc, protocol):
    """The peers' preprocessing, in PyTorch: clean-fid's ``legacy_tensorflow`` (StyleGAN's
    Inception detector: TF1's resize emulated by an affine grid shifted by 1/in - 1/out in
    normalised coordinates, border padding) or pytorch-fid's (ToTensor, interpolate, 2x - 1)."""
    F = torch.nn.functional
    x = torch.as_tensor(np.asarray(images_uint8_nhwc)).permute(0, 3, 1, 2).float()
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    n, c, h, w = x.shape
    if protocol == "pytorch-fid":
        x = F.interpolate(x / 255.0, size=(299, 299), mode="bilinear", align_corners=False)
        return (2 * x - 1).permute(0, 2, 3, 1)
    theta = torch.eye(2, 3)
    theta[0, 2] += 1.0 / w - 1.0 / 299
    theta[1, 2] += 1.0 / h - 1.0 / 299
    grid = F.affine_grid(theta[None].repeat(n, 1, 1), [n, c, 299, 299], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return ((x - 128) / 128).permute(0, 2, 3, 1)


@pytest.mark.parametrize("protocol", fid.FID_PROTOCOLS)
@pytest.mark.parametrize("shape", [(2, 32, 32, 3), (1, 28, 20, 1)])
def test_inception_inputs_match_the_peers(protocol, shape):
    torch = pytest.importorskip("torch")
    images = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    expected = _torch_inception_inputs(torch, images, protocol).numpy()
    got = np.asarray(fid.inception_inputs(images, protocol))
    assert got.shape == (shape[0], 299, 299, 3)
    # grid_sample computes its coordinates in float32 (normalised, then back): ~1e-6 pixels.
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_protocols_differ_by_the_grid_and_the_scale():
    # On a ramp along the width, the two grids differ by (1 - in/out)/2 input pixels (TF1's
    # samples that much further right) and the scales by 1/128 vs 2/255.
    ramp = np.broadcast_to(np.arange(32, dtype=np.uint8) * 8, (1, 32, 32))[..., None]
    tf1 = np.asarray(fid.inception_inputs(ramp, "legacy-tensorflow"))[0, 0, 100:110, 0]
    torch_grid = np.asarray(fid.inception_inputs(ramp, "pytorch-fid"))[0, 0, 100:110, 0]
    shift = 8 * 0.5 * (1 - 32 / 299)  # grey levels: the ramp rises 8 a pixel
    np.testing.assert_allclose(tf1 * 128 + 128, (torch_grid + 1) * 127.5 + shift, atol=1e-3)
    with pytest.raises(ValueError, match=r"protocol='clean'.*legacy-tensorflow"):
        fid.inception_inputs(ramp, "clean")


def test_to_uint8_inverts_tfds_scaling():
    # fmjax.data.TfdsSource maps u to u / 127.5 - 1 in float32; every u comes back exactly.
    u = np.arange(256, dtype=np.uint8)
    x = u.astype(np.float32) / 127.5 - 1.0
    np.testing.assert_array_equal(fid.to_uint8(x), u)
    # Meta's floor: a quarter level above u stays u, a quarter below falls to u - 1.
    quarter = 0.25 / 127.5
    np.testing.assert_array_equal(fid.to_uint8(x + quarter, "floor"), u)
    np.testing.assert_array_equal(fid.to_uint8(x[1:] - quarter, "floor"), u[1:] - 1)
    np.testing.assert_array_equal(fid.to_uint8(x[1:] - quarter), u[1:])
    with pytest.raises(ValueError, match=r"quantize='trunc'"):
        fid.to_uint8(x, "trunc")


# --- weights ----------------------------------------------------------------------------------

_ROLES = {
    ("params", "kernel"): "conv.weight",
    ("params", "scale"): "bn.weight",
    ("params", "bias"): "bn.bias",
    ("batch_stats", "mean"): "bn.running_mean",
    ("batch_stats", "var"): "bn.running_var",
}


def to_state_dict(variables):
    """The inverse of the converter (test side): Flax variables to pytorch-fid names and layouts,
    with the entries the converter must drop (head, counters)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        keys = [k.key for k in path]
        module = ".".join(keys[1:-2])
        value = np.asarray(leaf)
        if keys[-1] == "kernel":
            value = value.transpose(3, 2, 0, 1)
        out[f"{module}.{_ROLES[keys[0], keys[-1]]}"] = value
        if keys[-1] == "mean":
            out[f"{module}.bn.num_batches_tracked"] = np.array(0)
    out["fc.weight"], out["fc.bias"] = np.zeros((1008, 2048)), np.zeros(1008)
    return out


def test_converter_round_trip_and_names():
    variables = fid_inception.inception_variables(seed=1)
    state_dict = to_state_dict(variables)
    # pytorch-fid's names and (OIHW) shapes: 94 BasicConv2d, 5 tensors + a counter each, a head.
    assert len(state_dict) == 94 * 6 + 2
    assert state_dict["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert state_dict["Mixed_6b.branch7x7_2.conv.weight"].shape == (128, 128, 1, 7)
    assert state_dict["Mixed_7c.branch_pool.conv.weight"].shape == (192, 2048, 1, 1)
    assert state_dict["Mixed_7a.branch7x7x3_4.bn.running_var"].shape == (192,)
    converted = fid_inception.convert_state_dict(state_dict)
    jax.tree.map(np.testing.assert_array_equal, converted, variables)
    params = converted["params"]
    assert sum(v.size for v in jax.tree.leaves(params)) == 21_785_568


def test_converter_errors():
    state_dict = to_state_dict(fid_inception.inception_variables())
    missing = dict(state_dict)
    del missing["Mixed_5b.branch1x1.bn.bias"]
    with pytest.raises(ValueError, match=r"missing \['params/Mixed_5b/branch1x1/bn/bias'\]"):
        fid_inception.convert_state_dict(missing)
    with pytest.raises(ValueError, match=r"unexpected entries \['AuxLogits.conv0.conv.weight'\]"):
        fid_inception.convert_state_dict(
            {**state_dict, "AuxLogits.conv0.conv.weight": np.zeros((1,))}
        )
    wrong = {**state_dict, "Conv2d_1a_3x3.conv.weight": np.zeros((32, 3, 5, 5))}
    with pytest.raises(ValueError, match=r"Conv2d_1a_3x3.conv.weight has shape \(5, 5, 3, 32\)"):
        fid_inception.convert_state_dict(wrong)


def test_variables_file_round_trip(tmp_path):
    variables = fid_inception.inception_variables(seed=2)
    fid_inception.save_variables(tmp_path / "w.npz", variables)
    jax.tree.map(
        np.testing.assert_array_equal, fid_inception.load_variables(tmp_path / "w.npz"), variables
    )
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="does not hold FID Inception variables"):
        fid_inception.load_variables(tmp_path / "other.npz")


def test_missing_weights_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("FMJAX_CACHE", str(tmp_path))
    assert fid_inception.default_weights_path() == tmp_path / "pt_inception-2015-12-05-6726825d.npz"
    with pytest.raises(ValueError, match=r"No Inception weights.*fid convert.*fid download"):
        fid.load_inception()


# --- the network ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mesh():
    return make_mesh()


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (N_IMAGES, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def inception(mesh):
    return fid.make_inception(fid_inception.inception_variables(seed=0), mesh=mesh)


@pytest.fixture(scope="module")
def features(inception, images):
    return inception(images)


def test_inception_shapes_and_values(features):
    assert features.shape == (N_IMAGES, 2048) and features.dtype == np.float32
    # Means of ReLU outputs: non-negative, and informative (not collapsed to one vector).
    assert np.isfinite(features).all() and (features >= 0).all()
    assert features.std(axis=0).mean() > 1e-2 * features.mean()


def test_inception_padding_and_sharded_paths_agree(inception, images, features):
    # 3 images are padded to one image per device; the features do not depend on the padding,
    # and a global array on the devices gives the host path's features.
    np.testing.assert_array_equal(inception(images[:3]), features[:3])
    sharded = inception.sharded(jax.device_put(images))
    np.testing.assert_array_equal(np.asarray(sharded), features)


def test_inception_rejects_float_images(inception, images):
    with pytest.raises(ValueError, match=r"uint8 images.*to_uint8"):
        inception(images.astype(np.float32))


def _torch_fid_inception(torch):
    """pytorch-fid's FID Inception (torchvision's Inception-v3 names, FID blocks, a 1008-class
    head), written here from its published structure so the test needs only torch."""
    nn, F = torch.nn, torch.nn.functional

    class BasicConv2d(nn.Module):
        def __init__(self, cin, cout, **kwargs):
            super().__init__()
            self.conv = nn.Conv2d(cin, cout, bias=False, **kwargs)
            self.bn = nn.BatchNorm2d(cout, eps=0.001)

        def forward(self, x):
            return F.relu(self.bn(self.conv(x)))

    def avg(x):
        return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)

    class FIDInceptionA(nn.Module):
        def __init__(self, cin, pool_features):
            super().__init__()
            self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
            self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
            self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
            self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
            self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
            self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
            self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

        def forward(self, x):
            b5 = self.branch5x5_2(self.branch5x5_1(x))
            b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(avg(x))], 1)

    class InceptionB(nn.Module):
        def __init__(self, cin):
            super().__init__()
            self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
            self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
            self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
            self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

        def forward(self, x):
            b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)

    class FIDInceptionC(nn.Module):
        def __init__(self, cin, c7):
            super().__init__()
            row, col = (
                {"kernel_size": (1, 7), "padding": (0, 3)},
                {
                    "kernel_size": (7, 1),
                    "padding": (3, 0),
                },
            )
            self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
            self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
            self.branch7x7_2 = BasicConv2d(c7, c7, **row)
            self.branch7x7_3 = BasicConv2d(c7, 192, **col)
            self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
            self.branch7x7dbl_2 = BasicConv2d(c7, c7, **col)
            self.branch7x7dbl_3 = BasicConv2d(c7, c7, **row)
            self.branch7x7dbl_4 = BasicConv2d(c7, c7, **col)
            self.branch7x7dbl_5 = BasicConv2d(c7, 192, **row)
            self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

        def forward(self, x):
            b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            bd = self.branch7x7dbl_1(x)
            for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4):
                bd = layer(bd)
            bd = self.branch7x7dbl_5(bd)
            return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(avg(x))], 1)

    class InceptionD(nn.Module):
        def __init__(self, cin):
            super().__init__()
            self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
            self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
            self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
            self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
            self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

        def forward(self, x):
            b3 = self.branch3x3_2(self.branch3x3_1(x))
            b7 = self.branch7x7x3_1(x)
            for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
                b7 = layer(b7)
            return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)

    class FIDInceptionE(nn.Module):
        def __init__(self, cin, max_pool):
            super().__init__()
            self.max_pool = max_pool
            self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
            self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
            self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
            self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
            self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
            self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
            self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
            self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
            self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

        def forward(self, x):
            b3 = self.branch3x3_1(x)
            b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
            bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
            pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else avg(x)
            return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pool)], 1)

    class FIDInception3(nn.Module):
        def __init__(self):
            super().__init__()
            self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
            self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
            self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
            self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
            self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
            self.Mixed_5b = FIDInceptionA(192, 32)
            self.Mixed_5c = FIDInceptionA(256, 64)
            self.Mixed_5d = FIDInceptionA(288, 64)
            self.Mixed_6a = InceptionB(288)
            self.Mixed_6b = FIDInceptionC(768, 128)
            self.Mixed_6c = FIDInceptionC(768, 160)
            self.Mixed_6d = FIDInceptionC(768, 160)
            self.Mixed_6e = FIDInceptionC(768, 192)
            self.Mixed_7a = InceptionD(768)
            self.Mixed_7b = FIDInceptionE(1280, max_pool=False)
            self.Mixed_7c = FIDInceptionE(2048, max_pool=True)
            self.fc = nn.Linear(2048, 1008)

        def forward(self, images_uint8_nhwc):
            # clean-fid's legacy_tensorflow preprocessing, blocks 0-3, then pool3.
            x = _torch_inception_inputs(torch, images_uint8_nhwc, "legacy-tensorflow")
            x = x.permute(0, 3, 1, 2)
            x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
            x = F.max_pool2d(x, 3, stride=2)
            x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
            for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
                x = getattr(self, f"Mixed_{name}")(x)
            return F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)

    return FIDInception3()


def test_inception_matches_pytorch_reference(tmp_path, mesh, images):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = _torch_fid_inception(torch).eval()
    with torch.no_grad():  # weights that keep activations O(1) through 94 layers
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.normal_(0.0, math.sqrt(2.0 / fan_in))
            elif isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
        expected = model(torch.from_numpy(images)).numpy()
    torch.save(model.state_dict(), tmp_path / "inception.pth")

    fid_command.main(
        ["convert", f"--in={tmp_path / 'inception.pth'}", f"--out={tmp_path / 'w.npz'}"]
    )
    inception = fid.load_inception(tmp_path / "w.npz", mesh=mesh)
    got = inception(images)
    assert np.abs(expected).max() > 0.1  # a meaningful comparison, not of zeros
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


# --- statistics and FID -----------------------------------------------------------------------


def test_statistics_file_round_trip(tmp_path):
    rng = np.random.default_rng(4)
    stats = fid.GaussianStats.of(
        rng.standard_normal((10, 3)), weights="abc", protocol="legacy-tensorflow"
    )
    fid.save_statistics(tmp_path / "s.npz", stats, dataset="cifar10")
    loaded = fid.load_statistics(tmp_path / "s.npz")
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    assert (loaded.num_examples, loaded.weights, loaded.protocol) == (
        10,
        "abc",
        "legacy-tensorflow",
    )
    # pytorch-fid's and clean-fid's files hold only mu and sigma: no protocol recorded.
    np.savez(tmp_path / "pt.npz", mu=stats.mu, sigma=stats.sigma)
    assert fid.load_statistics(tmp_path / "pt.npz")[2:] == (0, "", "")
    # fmjax's files from before the protocol was recorded were pytorch-fid's.
    np.savez(tmp_path / "old.npz", mu=stats.mu, sigma=stats.sigma, num_examples=10, weights="abc")
    assert fid.load_statistics(tmp_path / "old.npz").protocol == "pytorch-fid"


def test_stats_command_on_mock_cifar10(tmp_path, mesh, inception):
    # Mock CIFAR-10 (8 random 32x32 images): same program as the fixture's images.
    fid_inception.save_variables(tmp_path / "w.npz", inception.variables)
    with tfds.testing.mock_data(num_examples=N_IMAGES):
        stored = TfdsSource("cifar10", "train").read(np.arange(N_IMAGES))[0]
        fid_command.main(
            [
                "stats",
                "--dataset=cifar10",
                "--split=train",
                f"--weights={tmp_path / 'w.npz'}",
                f"--out={tmp_path / 'ref.npz'}",
            ]
        )
    ref = fid.load_statistics(tmp_path / "ref.npz")
    expected = fid.GaussianStats.of(inception(np.asarray(fid.to_uint8(stored))))
    assert ref.num_examples == N_IMAGES and len(ref.weights) == 16
    assert ref.protocol == fid.DEFAULT_PROTOCOL == "legacy-tensorflow"
    np.testing.assert_allclose(ref.mu, expected.mu, rtol=1e-6)
    np.testing.assert_allclose(ref.sigma, expected.sigma, rtol=1e-5, atol=1e-9)
    # --flips: every image and its mirror image (Meta's flipped reference, in expectation).
    with tfds.testing.mock_data(num_examples=N_IMAGES // 2):
        four = np.asarray(fid.to_uint8(TfdsSource("cifar10", "train").read(np.arange(4))[0]))
        out = f"--out={tmp_path / 'flips.npz'}"
        fid_command.main(
            ["stats", "--dataset=cifar10", f"--weights={tmp_path / 'w.npz'}", "--flips", out]
        )
    flipped = fid.load_statistics(tmp_path / "flips.npz")
    both = fid.GaussianStats.of(inception(np.concatenate([four, four[:, :, ::-1]])))
    assert flipped.num_examples == N_IMAGES
    np.testing.assert_allclose(flipped.mu, both.mu, rtol=1e-6)
    np.testing.assert_allclose(flipped.sigma, both.sigma, rtol=1e-5, atol=1e-9)


def test_load_reference_takes_the_recorded_protocol(tmp_path, inception):
    fid_inception.save_variables(tmp_path / "w.npz", inception.variables)
    stats = fid.GaussianStats(np.zeros(3), np.eye(3))
    for recorded, given, expected in [
        ("pytorch-fid", None, "pytorch-fid"),
        ("", None, fid.DEFAULT_PROTOCOL),
        ("", "pytorch-fid", "pytorch-fid"),
    ]:
        fid.save_statistics(tmp_path / "s.npz", stats._replace(protocol=recorded))
        reference, features = fid.load_reference(
            tmp_path / "s.npz", tmp_path / "w.npz", protocol=given, mesh=inception.mesh
        )
        assert (reference.protocol, features.protocol) == (recorded, expected)


def _fake_features(images):
    """A tiny stand-in for Inception: per-channel means and the first pixel of each image."""
    x = np.asarray(images, np.float64)
    return np.concatenate([x.mean(axis=(1, 2)), x[:, 0, 0]], axis=1)


def test_fid_of_samples_with_fake_features(mesh):
    batch, num_samples = 8, 20  # three batches, the last one trimmed to 4
    calls = []
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))

    def sample_fn(index, batch_size):
        calls.append((index, batch_size))
        rng = np.random.default_rng(index)
        x = np.tanh(rng.standard_normal((batch_size, 4, 4, 3))).astype(np.float32)
        return jax.device_put(x, sharding)

    reference = fid.GaussianStats.of(
        np.random.default_rng(9).uniform(0, 255, (50, 6)), weights="some-weights"
    )
    result = fid.fid_of_samples(
        sample_fn, num_samples, reference, _fake_features, batch_size=batch, progress=False
    )
    assert calls == [(0, 8), (1, 8), (2, 8)]
    samples = np.concatenate([np.asarray(sample_fn(i, batch)) for i in range(3)])[:num_samples]
    expected = fid.GaussianStats.of(_fake_features(fid.to_uint8(samples)))
    assert result.stats.num_examples == num_samples
    np.testing.assert_allclose(result.stats.mu, expected.mu)
    assert result.fid == pytest.approx(
        frechet_distance(expected.mu, expected.sigma, reference.mu, reference.sigma)
    )
    # Meta's quantisation (floor) scores other grey levels.
    floored = fid.fid_of_samples(
        sample_fn, num_samples, reference, _fake_features, batch_size=batch, progress=False,
        quantize="floor",
    )  # fmt: skip
    np.testing.assert_allclose(
        floored.stats.mu, fid.GaussianStats.of(_fake_features(fid.to_uint8(samples, "floor"))).mu
    )
    assert floored.stats.mu.mean() < result.stats.mu.mean()
    # Against its own statistics, FID is zero.
    again = fid.fid_of_samples(
        sample_fn, num_samples, result.stats, _fake_features, batch_size=batch, progress=False
    )
    assert abs(again.fid) < 1e-6


def test_fid_of_samples_checks_weights_and_sizes(inception):
    reference = fid.GaussianStats(np.zeros(2048), np.eye(2048), 10, "other-weights")
    inception_from_file = fid.InceptionFeatures(
        inception.variables, inception.mesh, inception.batch_size, fingerprint="these-weights"
    )
    with pytest.raises(ValueError, match=r"other-weights.*these-weights"):
        fid.fid_of_samples(None, 10, reference, inception_from_file, batch_size=8)
    with pytest.raises(ValueError, match="at least 2 samples"):
        fid.fid_of_samples(None, 1, reference, _fake_features, batch_size=8)
    # Statistics of one protocol never score features of the other.
    other = reference._replace(weights="", protocol="pytorch-fid")
    with pytest.raises(ValueError, match=r"'pytorch-fid' FID protocol.*'legacy-tensorflow'"):
        fid.fid_of_samples(None, 10, other, inception, batch_size=8)
    with pytest.raises(ValueError, match=r"protocol='tf'"):
        fid.make_inception(inception.variables, mesh=inception.mesh, protocol="tf")
