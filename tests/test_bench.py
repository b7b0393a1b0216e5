"""The benchmark harness's own arithmetic (experiments/bench/)."""

import functools

import jax
import jax.numpy as jnp
import pytest

from experiments.bench import cpu_model, interleaved_seconds, machine, profile
from experiments.bench import train as bench_train
from fmjax._xla import solve_compiler_options
from fmjax.models.conv import conv_general_dilated, map_in_chunks


def test_step_flops_counts_every_trip_of_a_cpu_only_loop():
    # The shape of the U-Nets' CPU paths: a loop over chunks on CPU, one op elsewhere.
    # XLA's cost analysis counts the loop body once, i.e. a quarter of the products here.
    def products(x, w):
        return jax.lax.platform_dependent(
            x,
            cpu=lambda x: map_in_chunks(lambda c: c @ w, x, chunk=2),
            default=lambda x: x @ w,
        )

    x, w = jnp.ones((8, 64, 32)), jnp.ones((32, 16))
    step = jax.jit(products)
    compiled = step.lower(x, w).compile()
    flops, counted = bench_train.step_flops(step, compiled, x, w)
    assert counted == "loop-free (CUDA) lowering"
    assert flops == 2 * 8 * 64 * 32 * 16
    assert bench_train._flops_of(compiled.cost_analysis()) < flops / 2


def test_profile_shares_concurrent_time_equally_and_counts_gaps_as_idle():
    ops = {"conv": profile.Op("convolution: forward", 0.0), "add": profile.Op("element-wise", 0.0)}
    # conv alone for 5 us, with add for 5, add alone for 5, nothing for 5, conv for 10; the
    # runtime's own events are not operations.
    events = [(0, 10, "conv"), (5, 15, "add"), (20, 30, "conv"), (0, 30, "ThunkExecutor")]
    seconds = profile.attribute(events, ops)
    assert seconds["convolution: forward"] == pytest.approx(17.5e-6)
    assert seconds["element-wise"] == pytest.approx(7.5e-6)
    assert seconds["idle"] == pytest.approx(5e-6)
    assert sum(seconds.values()) == pytest.approx(30e-6)


def test_profile_of_a_convolution_gradient_finds_its_kinds_and_flops():
    batch, side, c_in, c_out = 4, 16, 4, 8
    dims = ("NHWC", "HWIO", "NHWC")

    def loss(x, kernel):
        numbers = jax.lax.conv_dimension_numbers(x.shape, kernel.shape, dims)
        y = conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=numbers)
        return jnp.sum(jnp.tanh(y) @ jnp.ones((c_out, 2)))

    x = jax.random.normal(jax.random.key(0), (batch, side, side, c_in))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, c_in, c_out))
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(x, kernel).compile()
    seconds, flops, by_op = profile.profile(compiled, x, kernel, steps=2)
    conv_flops = 2 * batch * side * side * c_in * c_out * 9
    assert flops["convolution: forward"] == conv_flops
    assert flops["convolution: input gradient"] == conv_flops
    # 16x16 maps on CPU: the kernel gradient is the tap form, 9 products per loop trip.
    assert flops["matmul: kernel gradient taps"] == conv_flops
    assert flops["convolution: kernel gradient"] == 0
    assert seconds["convolution: forward"] > 0 and seconds["element-wise"] > 0
    # The operations' shares add up to their kinds' (all but the idle time).
    assert sum(t for _, t in by_op.values()) == pytest.approx(
        sum(seconds.values()) - seconds["idle"]
    )
    assert {op.kind for op, _ in by_op.values()} >= {"matmul: kernel gradient taps"}


def test_profile_rows_refuse_bad_counts_before_building_anything():
    with pytest.raises(ValueError, match="top=-1"):
        profile.profile_rows("unet_tiny", (8, 8, 1), 4, steps=1, top=-1)
    with pytest.raises(ValueError, match="steps=0"):
        profile.profile_rows("unet_tiny", (8, 8, 1), 4, steps=0)


def test_side_by_side_sorts_both_libraries_into_the_same_parts():
    # PyTorch's operator names: convolutions (oneDNN's, the slow fallback), their backward
    # operators (both gradients), the matrix products; autograd's bookkeeping is "other".
    assert profile.torch_part("aten::mkldnn_convolution") == "convolution: forward"
    assert profile.torch_part("aten::_slow_conv2d_forward") == "convolution: forward"
    assert profile.torch_part("aten::convolution_backward") == "convolution: gradients"
    assert profile.torch_part("aten::_slow_conv2d_backward") == "convolution: gradients"
    assert profile.torch_part("aten::bmm") == "matmul"
    assert (
        profile.torch_part("autograd::engine::evaluate_function: ConvolutionBackward0") == "other"
    )
    assert profile.torch_part("aten::native_group_norm") == "other"
    ours = dict.fromkeys(profile.KINDS, 0.0) | {
        "convolution: forward": 2.0,
        "convolution: input gradient": 1.0,
        "convolution: kernel gradient": 0.5,
        "matmul: kernel gradient taps": 1.5,
        "matmul: forward": 0.25,
        "matmul: backward": 0.75,
        "element-wise": 0.5,
        "idle": 0.5,
    }
    theirs = {
        "convolution: forward": 1.0,
        "convolution: gradients": 2.0,
        "matmul": 1.0,
        "other": 2.0,
    }
    rows = {row["part"]: row for row in profile.compare_rows("p", 4, ours, theirs)}
    assert list(rows) == [*profile.PARTS, "step"]
    assert rows["convolution: forward"]["ratio"] == 2.0
    assert rows["convolution: gradients"]["fmjax_ms"] == 3000.0
    assert rows["matmul"]["ratio"] == 1.0
    assert rows["other"]["fmjax_ms"] == 1000.0 and rows["other"]["ratio"] == 0.5
    assert rows["step"]["fmjax_ms"] == 7000.0 and rows["step"]["pytorch_ms"] == 6000.0


def test_torch_profile_times_a_convolution_step_by_part():
    torch = pytest.importorskip("torch")
    x = torch.randn(4, 8, 16, 16)
    weight = torch.randn(8, 8, 3, 3, requires_grad=True)
    dense = torch.randn(8, 8, requires_grad=True)

    def step():
        y = torch.nn.functional.conv2d(x, weight, padding=1)
        (y.permute(0, 2, 3, 1) @ dense).square().mean().backward()

    seconds = profile.torch_profile(step, steps=2)
    assert list(seconds) == list(profile.PARTS)
    assert all(t > 0 for t in seconds.values()), seconds
    with pytest.raises(ValueError, match="steps=0"):
        profile.torch_profile(step, steps=0)


def test_side_by_side_without_torch_says_what_to_install(monkeypatch):
    from experiments.bench import conv

    monkeypatch.setattr(conv, "has_torch", lambda: False)
    with pytest.raises(ValueError, match=r"needs torch: pip install"):
        profile.main(["--preset", "unet_tiny", "--torch"])


def test_parse_xla_option_types_values_and_refuses_other_text():
    assert bench_train.parse_xla_option("xla_a=TRUE") == ("xla_a", True)
    assert bench_train.parse_xla_option(" xla_b = 3 ") == ("xla_b", 3)
    assert bench_train.parse_xla_option("xla_c=LIBRARY_FUSION_TYPE_DOT") == (
        "xla_c",
        "LIBRARY_FUSION_TYPE_DOT",
    )
    assert bench_train.parse_xla_option("xla_d=") == ("xla_d", "")  # a list option: none
    for text in ("xla_a", "=1", "two words=1", " = "):
        with pytest.raises(ValueError, match="NAME=VALUE"):
            bench_train.parse_xla_option(text)


_NHWC = ("NHWC", "HWIO", "NHWC")


def _counting_step():
    """A donating step whose loss counts the batch's NaNs after a multiplication by zero:
    two with IEEE arithmetic (inf * 0 and nan * 0), none under fast math."""

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state, batch):
        loss = jnp.sum(jnp.isnan(batch * 0.0).astype(jnp.float32)) + 0.0 * state["w"]
        return {"w": state["w"] + 1.0, "n": state["n"] + 1}, {"loss": loss}

    state = {"w": jnp.zeros(()), "n": jnp.zeros((), jnp.int32)}
    return step, state, jnp.array([1.0, jnp.inf, 2.0, jnp.nan])


def test_compare_compiler_options_times_each_variant_from_the_same_loss():
    step, state, batch = _counting_step()
    option = ("xla_cpu_enable_concurrency_optimized_scheduler", False)
    results = bench_train.compare_compiler_options(step, state, batch, [option], repeats=3)
    assert list(results) == [
        "default",
        bench_train.CONTROL,
        "xla_cpu_enable_concurrency_optimized_scheduler=False",
    ]
    for result in results.values():
        assert result.loss == 2.0
        assert len(result.seconds) == 3 and min(result.seconds) > 0
    assert results[bench_train.CONTROL].same_hlo


def test_compare_compiler_options_tells_an_option_that_changes_the_hlo():
    # A convolution of 16x16x32 maps becomes a YNNPACK fusion of its own under this option
    # (XLA leaves smaller ones alone): the optimized HLO differs, the control's cannot. (The
    # kernel is an argument: XLA:CPU in JAX 0.10.2 miscomputes a convolution by a constant
    # kernel of equal entries, e.g. a closed-over jnp.ones.)

    @functools.partial(jax.jit, donate_argnums=0)
    def step(kernel, batch):
        y = jax.lax.conv_general_dilated(batch, kernel, (1, 1), "SAME", dimension_numbers=_NHWC)
        return kernel, {"loss": jnp.mean(y)}

    option = ("xla_cpu_experimental_ynn_fusion_type", "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION")
    kernel = jax.random.normal(jax.random.key(0), (3, 3, 32, 32))
    batch = jax.random.normal(jax.random.key(1), (4, 16, 16, 32))
    results = bench_train.compare_compiler_options(step, kernel, batch, [option], 1)
    assert results[bench_train.CONTROL].same_hlo
    assert not results["=".join(option)].same_hlo


def test_compare_compiler_options_refuses_unknown_and_result_changing_options():
    step, state, batch = _counting_step()
    with pytest.raises(ValueError, match="xla_no_such_option=1"):
        bench_train.compare_compiler_options(step, state, batch, [("xla_no_such_option", 1)], 1)
    step, state, batch = _counting_step()
    with pytest.raises(ValueError, match=r"loss is 0\.0, against 2\.0"):
        bench_train.compare_compiler_options(
            step, state, batch, [("xla_cpu_enable_fast_math", True)], 1
        )


def test_sampling_option_rows_time_the_control_and_fmjaxs_options():
    from experiments.bench import sampling as bench_sampling

    rows = bench_sampling.option_rows(quick=True)  # results equal, or it raises
    if solve_compiler_options() is None:  # off CPU, or an XLA without the options
        assert rows == []
        return
    assert [row["options"] for row in rows] == ["XLA's defaults", bench_train.CONTROL, "fmjax's"]
    assert rows[0]["ratio"] == 1.0
    assert all(row["wall_ms"] > 0 for row in rows)


def test_interleaved_seconds_settles_each_timed_call_with_an_untimed_one_of_its_own():
    calls = []
    fns = {name: functools.partial(calls.append, name) for name in ("a", "b")}
    times = interleaved_seconds(fns, repeats=2, settle=True)
    # A warm-up each, then per repeat: a (untimed), a (timed), b (untimed), b (timed).
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] * 2
    assert {name: len(v) for name, v in times.items()} == {"a": 2, "b": 2}
    calls.clear()
    interleaved_seconds(fns, repeats=2)
    assert calls == ["a", "b"] * 3


def test_machine_names_the_glibc_tunables_that_change_cpu_step_times(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert "GLIBC_TUNABLES" not in machine()
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
    assert machine().endswith(", GLIBC_TUNABLES=glibc.malloc.hugetlb=1")


def test_cpu_model_reads_the_first_processor_of_cpuinfo(tmp_path):
    block = (
        "processor\t: {n}\nmodel name\t: {name}\ncpu family\t: 6\nmodel\t\t: 143\n"
        "flags\t\t: fpu sse2 avx2 {flags}\n\n"
    )
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        block.format(n=0, name="Xeon A", flags="avx512f amx_bf16 amx_tile")
        + block.format(n=1, name="Xeon B", flags="")
    )
    assert cpu_model(str(cpuinfo)) == "Xeon A (family 6, model 143, AVX-512, AMX)"
    cpuinfo.write_text(block.format(n=0, name="EPYC", flags=""))
    assert cpu_model(str(cpuinfo)) == "EPYC (family 6, model 143)"
    # Without a model name (not Linux, or another format), `platform` answers.
    assert cpu_model(str(tmp_path / "missing")) not in ("", "EPYC")
