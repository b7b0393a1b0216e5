"""fmjax's CIFAR-10 U-Nets against the peers' own PyTorch code (issue 36).

torchcfm's ``UNetModelWrapper`` with the configuration of its ``train_cifar10.py`` and random
weights (perturbed, so that the zero-initialised layers are not zero) is converted with
:func:`fmjax.models.params_from_torch`, and both networks are evaluated on the same inputs:
relative error at most 1e-4 in float32, unconditional and class-conditional; the other
direction loads :func:`fmjax.models.params_to_torch` of random fmjax parameters into the
PyTorch network. Meta's example network is not on PyPI: its configuration is built with
torchcfm's ``UNetModel`` (the same guided-diffusion class) with Meta's hyperparameters, and its
checkpoint layout (the EMA wrapper) with a state dict built here.

Needs ``torch`` (the CPU build) and ``torchcfm`` (``pip install --no-deps torchcfm pot``);
skipped without them. CI runs it in a leg of its own (.ci/run).
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
unet = pytest.importorskip("torchcfm.models.unet.unet")

from experiments import cifar10, convert  # noqa: E402
from experiments.configs.cifar10 import get_config  # noqa: E402
from fmjax.generate import SamplingOptions  # noqa: E402
from fmjax.models import (  # noqa: E402
    UNetCIFAR10Meta,
    UNetCIFAR10TorchCFM,
    UNetTiny,
    load_params,
    load_torch_checkpoint,
    params_from_torch,
    params_to_torch,
)

TOLERANCE = 1e-4


def torchcfm_net(num_classes=None):
    """torchcfm's CIFAR-10 network, as examples/images/cifar10/train_cifar10.py builds it."""
    return unet.UNetModelWrapper(
        dim=(3, 32, 32),
        num_res_blocks=2,
        num_channels=128,
        channel_mult=[1, 2, 2, 2],
        num_heads=4,
        num_head_channels=64,
        attention_resolutions="16",
        dropout=0.1,
        class_cond=num_classes is not None,
        num_classes=num_classes or 1000,
    ).eval()


def meta_net(num_classes=None):
    """Meta flow_matching's CIFAR-10 network (its examples/image config) through torchcfm's
    guided-diffusion class: 128 channels, multipliers (2, 2, 2), 4 blocks, attention at 16x16
    with one head, scale-shift norm, no resblock up/down, no conv resampling, the new attention
    order; conditional: num_classes + 1 label rows, the last (null) one at zero."""
    net = unet.UNetModel(
        image_size=32,
        in_channels=3,
        model_channels=128,
        out_channels=3,
        num_res_blocks=4,
        attention_resolutions=(2,),
        dropout=0.3,
        channel_mult=(2, 2, 2),
        conv_resample=False,
        num_classes=None if num_classes is None else num_classes + 1,
        num_heads=1,
        use_scale_shift_norm=True,
        resblock_updown=False,
        use_new_attention_order=True,
    ).eval()
    return net


def perturb(net, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
        if getattr(net, "label_emb", None) is not None and net.label_emb.weight.shape[0] == 11:
            net.label_emb.weight[-1] = 0.0  # Meta's padding_idx row
    return net


def state_dict_of(net):
    return {k: v.numpy() for k, v in net.state_dict().items()}


def inputs(num_classes, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2, 3, 32, 32)).astype(np.float32)
    t = np.array([0.25, 0.9], np.float32)
    y = None if num_classes is None else np.array([3, num_classes - 1])
    return x, t, y


def torch_out(net, x, t, y):
    with torch.no_grad():
        kwargs = {} if y is None else {"y": torch.from_numpy(y)}
        return net(torch.from_numpy(t), torch.from_numpy(x), **kwargs).numpy()


def fmjax_out(model, params, x, t, y):
    kwargs = {} if y is None else {"y": jnp.asarray(y)}
    out = model.apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)), t, **kwargs)
    return np.asarray(out).transpose(0, 3, 1, 2)


def relative_error(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def random_fmjax_params(model, seed):
    """Random parameters of every layer (zero-initialised ones too) and a zero null row."""
    x = jnp.zeros((1, 32, 32, 3))
    shapes = jax.eval_shape(model.init, jax.random.key(0), x, jnp.zeros(1))["params"]
    rng = np.random.default_rng(seed)
    leaves, tree = jax.tree.flatten(shapes)
    params = jax.tree.unflatten(
        tree, [(0.05 * rng.normal(size=s.shape)).astype(np.float32) for s in leaves]
    )
    if model.num_classes is not None:
        params["label_embedding"]["embedding"][-1] = 0.0
    return params


CASES = {
    "torchcfm": (torchcfm_net, UNetCIFAR10TorchCFM, "torchcfm", None),
    "torchcfm_conditional": (torchcfm_net, UNetCIFAR10TorchCFM, "torchcfm", 10),
    "meta": (meta_net, UNetCIFAR10Meta, "meta", None),
    "meta_conditional": (meta_net, UNetCIFAR10Meta, "meta", 10),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_torch_to_fmjax_and_back_give_the_peers_outputs(case):
    build_net, preset, peer, num_classes = CASES[case]
    torch.manual_seed(0)
    net = perturb(build_net(num_classes))
    model = preset(num_classes=num_classes)
    x, t, y = inputs(num_classes)
    expected = torch_out(net, x, t, y)

    # PyTorch -> fmjax: the same function.
    state_dict = state_dict_of(net)
    params = params_from_torch(state_dict, model, peer=peer)
    error = relative_error(fmjax_out(model, params, x, t, y), expected)
    print(f"{case}: torch -> fmjax max relative error {error:.2e}")
    assert error <= TOLERANCE
    # ... and back, exactly.
    back = params_to_torch(params, model, peer=peer)
    assert set(back) == set(state_dict)
    for name, value in state_dict.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)

    # fmjax -> PyTorch: random fmjax parameters loaded into the peer's network.
    params = random_fmjax_params(model, seed=1)
    net.load_state_dict(
        {k: torch.from_numpy(v) for k, v in params_to_torch(params, model, peer=peer).items()}
    )
    error = relative_error(torch_out(net, x, t, y), fmjax_out(model, params, x, t, y))
    print(f"{case}: fmjax -> torch max relative error {error:.2e}")
    assert error <= TOLERANCE


# --- checkpoint files ---------------------------------------------------------------------------


def tiny_state_dict(seed=0, peer="torchcfm"):
    """A PyTorch state dict of UNetTiny (torchcfm's GroupNorm32 cannot build its 4 groups, so it
    comes from fmjax's own export; the files, not the network, are under test here)."""
    model = UNetTiny()
    params = model.init(jax.random.key(seed), jnp.zeros((1, 8, 8, 3)), jnp.zeros(1))["params"]
    return params, params_to_torch(params, model, (8, 8, 3), peer=peer)


def tensors(state_dict, prefix=""):
    return {prefix + k: torch.from_numpy(v.copy()) for k, v in state_dict.items()}


def test_a_torchcfm_checkpoint_converts_and_samples(tmp_path, capsys):
    _, raw = tiny_state_dict(0)
    params, ema = tiny_state_dict(1)
    # train_cifar10.py's checkpoint, written from a DDP-wrapped model.
    ckpt = tmp_path / "cfm.pt"
    torch.save(
        {
            "net_model": tensors(raw, "module."),
            "ema_model": tensors(ema, "module."),
            "sched": {"last_epoch": 3},
            "optim": {"state": {}, "param_groups": [{"lr": 2e-4}]},
            "step": 400000,
        },
        ckpt,
    )
    for weights, expected in (("ema", ema), ("raw", raw)):
        loaded = load_torch_checkpoint(ckpt, source="torchcfm", weights=weights)
        assert set(loaded) == {f"module.{k}" for k in expected}
        np.testing.assert_array_equal(loaded["module.out.2.weight"], expected["out.2.weight"])

    out = tmp_path / "cfm.npz"
    convert.main([f"--in={ckpt}", f"--out={out}", "--preset=unet_tiny"])
    assert "wrote" in capsys.readouterr().out
    np.testing.assert_array_equal(
        load_params(out, UNetTiny(), preset="unet_tiny")["conv_in"]["kernel"],
        params["conv_in"]["kernel"],
    )
    # ... exported back as the peer's state dict.
    exported = tmp_path / "sd.pt"
    convert.main([f"--in={out}", f"--out={exported}", "--preset=unet_tiny", "--to_torch"])
    state_dict = torch.load(exported, weights_only=True)
    assert set(state_dict) == set(ema)
    np.testing.assert_array_equal(
        state_dict["time_embed.0.weight"].numpy(), ema["time_embed.0.weight"]
    )

    # experiments.cifar10 --mode=sample --params=... at smoke scale, and from the .pt directly.
    config = get_config("torchcfm,smoke")
    options = SamplingOptions(num_samples=4, steps=2, batch_size=4)
    for kwargs in ({"params": out}, {"torch_checkpoint": ckpt}):
        network = cifar10.imported_network(config, **kwargs)
        result = cifar10.run(config, tmp_path / "samples", "sample", options, network=network)
        images = np.load(result.npz, allow_pickle=False)["images"]
        assert images.shape == (4, 8, 8, 3) and np.isfinite(images).all()


def test_a_meta_checkpoint_converts_ema_and_raw_weights(tmp_path):
    _, raw = tiny_state_dict(0, peer="meta")
    _, ema = tiny_state_dict(1, peer="meta")
    names = list(raw)  # no buffers: the order of the state dict is that of the parameters
    wrapper = {f"model.{k}": torch.from_numpy(v.copy()) for k, v in raw.items()}
    wrapper["num_updates"] = torch.tensor(175000)
    wrapper.update(
        {f"shadow_params.{i}": torch.from_numpy(ema[k].copy()) for i, k in enumerate(names)}
    )
    ckpt = tmp_path / "meta.pth"
    args = argparse.Namespace(lr=1e-4, batch_size=64, dataset="cifar10")
    torch.save({"model": wrapper, "optimizer": {"state": {}}, "args": args, "epoch": 1799}, ckpt)

    for weights, expected in (("ema", ema), ("raw", raw)):
        loaded = load_torch_checkpoint(ckpt, source="meta", weights=weights)
        assert list(loaded) == names
        for k in names:
            np.testing.assert_array_equal(loaded[k], expected[k])
    out = tmp_path / "meta.npz"
    convert.main([f"--in={ckpt}", f"--out={out}", "--preset=unet_tiny", "--source=meta"])
    load_params(out, UNetTiny(), preset="unet_tiny")

    # A wrapper whose shadow parameters do not line up with the model's is refused.
    del wrapper["shadow_params.3"]
    torch.save({"model": wrapper, "args": args}, ckpt)
    with pytest.raises(ValueError, match="not Meta's EMA wrapper"):
        load_torch_checkpoint(ckpt, source="meta")


class NotWeights:
    """An object a pickle would construct (and could run code for)."""

    def __reduce__(self):
        return (print, ("this would run",))


def test_bad_checkpoints_get_one_clear_error_each(tmp_path, capsys):
    _, sd = tiny_state_dict(0)
    good = tmp_path / "good.pt"
    torch.save({"net_model": tensors(sd), "ema_model": tensors(sd)}, good)

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(ValueError, match=r"not a complete PyTorch checkpoint.*truncated"):
        load_torch_checkpoint(truncated)

    pickled = tmp_path / "pickled.pt"
    torch.save({"ema_model": NotWeights()}, pickled)
    with pytest.raises(ValueError, match=r"holds objects other than tensors.*never runs"):
        load_torch_checkpoint(pickled)
    assert "this would run" not in capsys.readouterr().out

    with pytest.raises(ValueError, match="No checkpoint at"):
        load_torch_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="no 'model' entry, so it is not a Meta"):
        load_torch_checkpoint(good, source="meta")
    with pytest.raises(ValueError, match="weights='best' is not valid"):
        load_torch_checkpoint(good, weights="best")

    # The wrong preset: every mismatch listed in one error, which names the remedy.
    state_dict = load_torch_checkpoint(good)
    with pytest.raises(ValueError, match=r"missing, .* unexpected, .* mis-shaped. Is the preset"):
        params_from_torch(state_dict, UNetCIFAR10TorchCFM(), (8, 8, 3))
    with pytest.raises(SystemExit) as exit_info:
        convert.main([f"--in={good}", f"--out={tmp_path / 'x.npz'}", "--preset=unet_cifar10_meta"])
    assert exit_info.value.code == 2
    assert "error: The state dict is not the torchcfm PyTorch network" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        convert.main([f"--in={good}", f"--out={tmp_path / 'x.npz'}", "--preset=unet_huge"])
    assert "--preset='unet_huge' is not a known model" in capsys.readouterr().err


# --- bridge noise: torchcfm's I-CFM (sigma > 0) and SB-CFM on the same draws ----------------


def _torchcfm_draws(matcher, x0, x1, seed):
    """torchcfm's ``(t, x_t, u_t, eps)`` and the pairs its coupling drew (numpy's generator
    draws the pairs first, then torch draws t and eps: replaying numpy's seed replays them)."""
    torch.manual_seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - torchcfm draws pairs from numpy's global generator
    t, x_t, u_t, eps = matcher.sample_location_and_conditional_flow(x0, x1, return_noise=True)
    pairs = (x0, x1)
    if hasattr(matcher, "ot_sampler"):
        np.random.seed(seed)  # noqa: NPY002
        pairs = matcher.ot_sampler.sample_plan(x0, x1)
    return [np.asarray(a) for a in (*pairs, t, x_t, u_t, eps)]


@pytest.mark.parametrize("kind", ["icfm", "sbcfm"])
def test_bridge_noise_matches_torchcfm_on_the_same_draws(kind):
    from torchcfm.conditional_flow_matching import (
        ConditionalFlowMatcher,
        SchrodingerBridgeConditionalFlowMatcher,
    )

    from fmjax.paths import AffinePath, BrownianBridge, CondOT, ConstantBridge

    sigma = 0.5
    if kind == "icfm":
        matcher, bridge, shape = ConditionalFlowMatcher(sigma), ConstantBridge(sigma), (8, 3, 4, 4)
    else:
        matcher = SchrodingerBridgeConditionalFlowMatcher(sigma, ot_method="sinkhorn")
        bridge, shape = BrownianBridge(sigma), (64, 2)
    generator = torch.Generator().manual_seed(1)
    x0 = torch.randn(shape, generator=generator)
    x1 = 2.0 * torch.randn(shape, generator=generator) + 1.0
    x0, x1, t, x_t, u_t, eps = _torchcfm_draws(matcher, x0, x1, seed=2)
    # torchcfm's eps is fmjax's bridge noise z; x0, x1 and t mean the same in both.
    ours = AffinePath(CondOT(), bridge=bridge).sample(x0, x1, t, eps)
    np.testing.assert_allclose(ours.x_t, x_t, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ours.dx_t, u_t, rtol=1e-5, atol=1e-5)


def test_sinkhorn_plan_matches_torchcfm_sb_cfm_for_epsilon_two_sigma_squared():
    # SchrodingerBridgeConditionalFlowMatcher(sigma, "sinkhorn") plans with POT's sinkhorn and
    # reg = 2 sigma^2 on squared distances: sinkhorn_ot(epsilon=2 sigma^2)'s plan.
    from torchcfm.conditional_flow_matching import SchrodingerBridgeConditionalFlowMatcher

    from fmjax.couplings import sinkhorn_log_plan, squared_distances

    sigma = 0.5
    matcher = SchrodingerBridgeConditionalFlowMatcher(sigma, ot_method="sinkhorn")
    generator = torch.Generator().manual_seed(3)
    x0 = torch.randn((32, 2), generator=generator, dtype=torch.float64)
    x1 = 2.0 * torch.randn((32, 2), generator=generator, dtype=torch.float64) + 1.0
    theirs = matcher.ot_sampler.get_map(x0, x1)
    with jax.enable_x64(True):
        cost = squared_distances(jnp.asarray(x0.numpy()), jnp.asarray(x1.numpy()))
        ours = np.exp(np.asarray(sinkhorn_log_plan(cost, 2 * sigma**2, num_iters=2000)))
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6 / 32**2)
    assert np.abs(ours - theirs).max() < 1e-3 * theirs.max()
