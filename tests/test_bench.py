"""The benchmark harness's own arithmetic (experiments/bench/)."""

import functools
import pathlib
import subprocess

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from helpers import TinyVelocity

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


# The tests' MLP, whose fields compute it in other forms: "transposed" (the same function
# through transposed products), activation="silu_by_tanh" (the same function), "doubled"
# (another function). Its output layer starts at zero, as the U-Nets' attention projections do.
_FORMS = TinyVelocity(hidden=16, zero_output=True)


def _forms_step():
    return bench_train.build_step("tiny_velocity", (4, 4, 1), 8, module=_FORMS)


def _compare_forms(variants, repeats):
    return bench_train.compare_model_options(*_forms_step(), variants, repeats, module=_FORMS)


def test_compare_model_options_times_a_model_computed_another_way_from_the_same_state():
    results = _compare_forms([{"form": "transposed"}], repeats=2)
    assert list(results) == ["default", bench_train.CONTROL, "form=transposed"]
    reference = results["default"]
    assert reference.loss > 0 and reference.grad_norm > 0
    for result in results.values():
        assert result.loss == pytest.approx(reference.loss, rel=1e-4)
        assert result.grad_norm == pytest.approx(reference.grad_norm, rel=1e-4)
        assert len(result.seconds) == 2 and min(result.seconds) > 0


def test_a_model_variant_sets_several_fields_at_once_and_is_checked_as_one():
    variant = bench_train.parse_model_variant(" form=transposed  activation=silu_by_tanh ")
    assert variant == {"form": "transposed", "activation": "silu_by_tanh"}
    results = _compare_forms([variant], 1)
    assert list(results)[-1] == "form=transposed activation=silu_by_tanh"
    assert results["form=transposed activation=silu_by_tanh"].loss == pytest.approx(
        results["default"].loss, rel=1e-4
    )
    doubled = {"form": "doubled", "activation": "silu_by_tanh"}
    with pytest.raises(
        ValueError, match="with 'form=doubled activation=silu_by_tanh' the step's loss is"
    ):
        _compare_forms([doubled], 1)
    for text in ("", "form=plain form=doubled"):
        with pytest.raises(
            ValueError, match=r"NAME=VALUE \[NAME=VALUE \.\.\.\] with each NAME once"
        ):
            bench_train.parse_model_variant(text)
    with pytest.raises(ValueError, match="a model option must read NAME=VALUE; got 'form'"):
        bench_train.parse_model_variant("activation=silu_by_tanh form")


def test_option_rows_of_a_model_option_name_each_variant_with_its_checked_values_and_times():
    rows = bench_train.option_rows(
        "tiny_velocity", (4, 4, 1), 8, 2, [{"form": "transposed"}], "float32", model=True,
        module=_FORMS,
    )  # fmt: skip
    assert [row["option"] for row in rows] == ["default", bench_train.CONTROL, "form=transposed"]
    for row in rows:
        assert row["preset"] == "tiny_velocity" and row["batch_per_device"] == 8
        assert row["loss"] > 0 and row["grad_norm"] > 0 and "seconds" not in row
        assert 0 < row["best_ms"] <= row["median_ms"]
    assert rows[0]["median_vs_default"] == 1.0


def test_compare_model_options_refuses_another_function_and_unknown_fields():
    # At the fresh state the zero output layer hides "doubled" (both outputs are 0); the
    # check runs from perturbed parameters, where it cannot hide.
    with pytest.raises(ValueError, match="with 'form=doubled' the step's loss is"):
        _compare_forms([{"form": "doubled"}], 1)
    with pytest.raises(ValueError, match="'width=3' is not a field of the model"):
        _compare_forms([{"width": 3}], 1)
    with pytest.raises(ValueError, match="form='squared' is not valid"):
        _compare_forms([{"form": "squared"}], 1)


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


def _gpu_trace(kernels):
    """A Perfetto trace shaped as jax.profiler writes one on a GPU: a host process, a device
    process with a stream thread (the kernels) and an "XLA Ops" thread (a summary of them)."""
    meta = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
        {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {
            "ph": "M",
            "pid": 2,
            "tid": 7,
            "name": "thread_name",
            "args": {"name": "Stream #7(Compute)"},
        },
        {"ph": "M", "pid": 2, "tid": 9, "name": "thread_name", "args": {"name": "XLA Ops"}},
    ]
    events = [{"ph": "X", "pid": 1, "tid": 1, "ts": 0, "dur": 500, "name": "PjitFunction(step)"}]
    for start, dur, name in kernels:
        events.append({"ph": "X", "pid": 2, "tid": 7, "ts": start, "dur": dur, "name": name})
        events.append({"ph": "X", "pid": 2, "tid": 9, "ts": start, "dur": dur, "name": "fusion.1"})
    return {"traceEvents": meta + events}


def test_gpu_kernel_summary_reads_stream_kernels_once_and_sorts_them_by_kind():
    from experiments.bench import kernels

    trace = _gpu_trace(
        [
            (0, 300, "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc"),
            (300, 100, "nvjet_hsh_128x256_64x4_2x1_v_bz_coopB_TNT"),
            (450, 50, "loop_add_fusion_3"),
            (1000, 300, "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc"),
            (1300, 150, "input_reduce_fusion_1"),
            (1450, 50, "loop_add_fusion_3"),
        ]
    )
    events = kernels.device_events(trace, op_names=set())
    assert len(events) == 6  # neither the host's event nor the "XLA Ops" summaries
    by_kind, busy_ms, top = kernels.summarize(events, steps=2, top=2)
    # Two steps: per step 0.3 ms of convolution, 0.05 of matmul, 0.075 of reduction, 0.05 of
    # element-wise; the device was busy 0.45 ms of the first (a gap at 400-450 us) and 0.5 ms
    # of the second.
    assert by_kind["convolution"] == pytest.approx(0.3)
    assert by_kind["matmul"] == pytest.approx(0.05)
    assert by_kind["reduction"] == pytest.approx(0.075)
    assert by_kind["element-wise"] == pytest.approx(0.05)
    assert by_kind["attention"] == by_kind["other"] == by_kind["data movement"] == 0
    assert busy_ms == pytest.approx(0.475)
    assert top[0] == ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", 0.3, 1.0)
    assert top[1][0] == "input_reduce_fusion_1"


def test_gpu_kernel_summary_falls_back_to_hlo_named_events_without_a_device_process():
    from experiments.bench import kernels

    trace = {
        "traceEvents": [
            {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
            {"ph": "X", "pid": 1, "tid": 1, "ts": 0, "dur": 40, "name": "convolution.3"},
            {"ph": "X", "pid": 1, "tid": 2, "ts": 10, "dur": 40, "name": "fusion.2"},
            {"ph": "X", "pid": 1, "tid": 1, "ts": 0, "dur": 90, "name": "ThunkExecutor"},
        ]
    }
    events = kernels.device_events(trace, op_names={"convolution.3", "fusion.2"})
    assert sorted(name for _, _, name in events) == ["convolution.3", "fusion.2"]
    assert kernels.busy_microseconds(events) == 50  # overlapping intervals count once


def test_kernel_rows_refuse_bad_counts_before_building_anything():
    from experiments.bench import kernels

    with pytest.raises(ValueError, match="steps and batch must be positive"):
        kernels.kernel_rows("unet_tiny", (8, 8, 1), batch=0, dtype="float32")
    with pytest.raises(ValueError, match="sample batch and steps must be positive"):
        kernels.sampling_row("unet_tiny", (8, 8, 1), batch=4, dtype="float32", steps=0)


def test_pipelined_step_seconds_runs_blocks_of_steps_back_to_back_on_the_held_state():
    step = jax.jit(lambda state, batch: (state + batch, {"loss": state.sum()}), donate_argnums=0)
    holder = {"state": jnp.zeros(3)}
    seconds = bench_train.pipelined_step_seconds(step, holder, jnp.ones(3), steps=4, blocks=2)
    assert 0 < seconds < 10
    assert holder["state"].tolist() == [8.0, 8.0, 8.0]  # 2 blocks of 4 steps, each from the last
    with pytest.raises(ValueError, match="steps and blocks must be positive; got 0 and 3"):
        bench_train.pipelined_step_seconds(step, holder, jnp.ones(3), steps=0)


def test_preset_shape_reads_h_w_c_and_refuses_anything_else():
    assert bench_train.preset_shape("unet_cifar10_meta", None) == (32, 32, 3)
    assert bench_train.preset_shape("unet_cifar10_meta", "8, 8,3") == (8, 8, 3)
    for text in ("8,8", "8,8,0", "8,8,x", "8,8,3,1", "-8,8,3"):
        with pytest.raises(ValueError, match="three positive integers H,W,C"):
            bench_train.preset_shape("unet_tiny", text)


def test_layer_shapes_of_the_meta_preset_are_its_levels_and_attention_blocks():
    from experiments.bench.layers import layer_shapes

    shapes = layer_shapes("unet_cifar10_meta", (32, 32, 3), 128)
    assert shapes["group_norm"] == [(128, 32, 32, 256), (128, 16, 16, 256), (128, 8, 8, 256)]
    # attention at 16x16 (attention_ds=(2,)) and in the middle, one head of 256 channels
    assert shapes["attention"] == [((128, 16, 16, 256), 1), ((128, 8, 8, 256), 1)]


class _Scaled(nn.Module):
    """``x @ w * factor``: one parameter ``w``, another function for each ``factor``; a
    negative factor cannot run (a ValueError at trace time, as cuDNN's forms raise here)."""

    factor: float = 1.0

    @nn.compact
    def __call__(self, x):
        if self.factor < 0:
            raise ValueError("this form cannot run here")
        w = self.param("w", nn.initializers.normal(1.0), (x.shape[-1], x.shape[-1]))
        return x @ w * self.factor


def test_compare_forms_times_equal_forms_reports_forms_that_cannot_run_and_refuses_others():
    from experiments.bench.layers import compare_forms

    x = jax.random.normal(jax.random.key(0), (4, 8))
    forms = {"a": _Scaled(), "b": _Scaled(1.0 + 1e-6), "none": _Scaled(-1.0)}
    rows = compare_forms("scaled", forms, x, "float32", 2, {"extra": 1})
    assert [row["form"] for row in rows] == ["a", "b", "none"]
    assert rows[0]["forward_vs_first"] == 1 and rows[1]["max_rel_difference"] < 1e-5
    assert all(rows[i]["gradient_ms"] > 0 and rows[i]["extra"] == 1 for i in (0, 1))
    assert rows[2]["error"] == "this form cannot run here" and "forward_ms" not in rows[2]
    with pytest.raises(ValueError, match=r"computed by 'b' differs from 'a' by 0\.1"):
        compare_forms("scaled", {"a": _Scaled(), "b": _Scaled(1.1)}, x, "float32", 1, {})


_GPU_SCRIPT = pathlib.Path(__file__).parents[1] / "experiments" / "bench" / "gpu.sh"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--only", "train,sampling,bogus"], "--only: unknown part 'bogus'; expected some of"),
        (["--fast"], "unknown option --fast; usage: gpu.sh"),
    ],
)
def test_gpu_script_parses_and_refuses_bad_arguments_before_any_work(tmp_path, args, message):
    # The script runs only where a GPU is lent, minutes at a time: a syntax error or a typo in
    # a part's name must show here, before anything is installed, timed or written.
    assert subprocess.run(["bash", "-n", str(_GPU_SCRIPT)], check=False).returncode == 0
    results = tmp_path / "results"
    done = subprocess.run(
        ["bash", str(_GPU_SCRIPT), *args, str(results)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2 and message in done.stderr
    assert not results.exists()


def test_objective_rows_time_both_objectives_relative_to_flow_matching():
    rows = bench_train.objective_rows("unet_tiny", (8, 8, 1), 2, repeats=1, dtype="float32")
    assert [r["benchmark"] for r in rows] == [
        "train step, flow_matching",
        "train step, mean_flow",
    ]
    assert rows[0]["relative_to_flow_matching"] == 1.0
    assert all(r["step_ms"] > 0 for r in rows)


def test_transformer_rows_name_their_fields_and_remat_counts_the_recomputation():
    row = bench_train.step_row(
        "dit_tiny",
        (8, 8, 1),
        2,
        1,
        1e12,
        "float32",
        {"remat": True, "num_classes": 10},
        timed=False,
    )
    assert (row["preset"], row["image_shape"], row["classes"]) == ("dit_tiny", "8x8x1", 10)
    assert row["model_fields"] == "remat=True num_classes=10"
    assert 0.04 < row["params_m"] < 0.06 and row["peak_memory_mb"] > 0
    assert "step_ms" not in row  # compiled and counted, not run
    # Remat runs each block's forward pass again in the backward pass: more FLOPs, not twice.
    step, state, batch, config = bench_train.build_step(
        "dit_tiny", (8, 8, 1), 2, "float32", model_fields={"num_classes": 10}
    )
    plain, counted = bench_train.step_flops(step, None, state, batch)
    assert counted == "loop-free (CUDA) lowering" and config.model.num_classes == 10
    assert 1.1 < row["gflop_per_step_per_device"] * 1e9 / plain < 1.6


def test_presets_keep_their_class_count_and_the_transformers_their_latent_shape():
    assert bench_train.preset_shape("sit_b_2", None) == (32, 32, 4)
    assert bench_train.preset_shape("sit_s_2", "32,32,3") == (32, 32, 3)
    _, _, _, config = bench_train.build_step("dit_tiny", (8, 8, 1), 1, "float32")
    assert config.model.num_classes is None  # the preset's own
    cases = {case.preset: case for case in bench_train.TRANSFORMERS_ACCELERATOR}
    assert cases["sit_xl_2"].model == {"remat": True} and cases["sit_b_2"].image_shape[2] == 4
    on_cpu = {case.preset: case for case in bench_train.TRANSFORMERS_CPU}
    assert not on_cpu["sit_xl_2"].timed and on_cpu["sit_s_2"].image_shape == (32, 32, 3)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--remat"], "name it with --preset"),
        (["--num-classes", "-1"], r"--num-classes=-1 must be >= 0"),
        (["--transformers", "--preset", "sit_s_2"], "drop --preset"),
        (
            ["--preset", "unet_tiny", "--remat", "--flops-only", "--repeats", "1"],
            r"config.model.remat=True is not a field of the preset 'unet_tiny' \(UNet\)",
        ),
    ],
)
def test_train_bench_refuses_bad_transformer_flags(argv, message):
    with pytest.raises(ValueError, match=message):
        bench_train.main(argv)
