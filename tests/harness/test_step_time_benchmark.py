"""The step-time benchmark's op counts: the HLO parse, the per-layer column, the workloads."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from examples.harness import compiled_ops


@pytest.fixture(scope="module")
def step_time():
  from benchmarks import step_time

  return step_time


# A module in the shape XLA:GPU writes: tuple-shaped instructions, a command buffer
# reached through `call`, library GEMM and convolution calls, a fusion around a dot.
HLO = """HloModule jit_step, is_scheduled=true, entry_computation_layout={(f32[8,4]{1,0})->(f32[8,3]{1,0}, f32[])}

%fused_dot (p0: f32[8,4], p1: f32[4,3]) -> f32[8,3] {
  %p0 = f32[8,4]{1,0} parameter(0)
  %p1 = f32[4,3]{1,0} parameter(1)
  ROOT %dot.1 = f32[8,3]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_add (p0.1: f32[8,3]) -> f32[8,3] {
  %p0.1 = f32[8,3]{1,0} parameter(0)
  ROOT %add.1 = f32[8,3]{1,0} add(%p0.1, %p0.1)
}

%command_buffer (q0: f32[8,4], q1: f32[4,3]) -> (f32[8,3], f32[8,3]) {
  %q0 = f32[8,4]{1,0} parameter(0)
  %q1 = f32[4,3]{1,0} parameter(1)
  %gemm_fusion = f32[8,3]{1,0} fusion(%q0, %q1), kind=kCustom, calls=%fused_dot
  %loop_add_fusion = f32[8,3]{1,0} fusion(%gemm_fusion), kind=kLoop, calls=%fused_add
  ROOT %tuple.2 = (f32[8,3]{1,0}, f32[8,3]{1,0}) tuple(%gemm_fusion, %loop_add_fusion)
}

ENTRY %main.9 (x.1: f32[8,4]) -> (f32[8,3], f32[]) {
  %x.1 = f32[8,4]{1,0} parameter(0)
  %constant.3 = f32[4,3]{1,0} constant({...})
  %call = (f32[8,3]{1,0}, f32[8,3]{1,0}) call(%x.1, %constant.3), to_apply=%command_buffer
  %get-tuple-element.1 = f32[8,3]{1,0} get-tuple-element(%call), index=0
  %custom-call.1 = (f32[8,3]{1,0}, s8[64]{0}) custom-call(%x.1, %constant.3), custom_call_target="__cublas$gemm"
  %custom-call.2 = (f32[1,8,8,3]{3,2,1,0}, u8[0]{0}) custom-call(%x.1), custom_call_target="__cudnn$convForward"
  %copy-start = (f32[8,3]{1,0}, f32[8,3]{1,0}, u32[]) copy-start(%get-tuple-element.1)
  %copy-done = f32[8,3]{1,0} copy-done(%copy-start)
  %all-reduce = f32[] all-reduce(%constant.3), to_apply=%fused_add
  %bitcast.1 = f32[8,3]{1,0} bitcast(%copy-done)
  ROOT %tuple.9 = (f32[8,3]{1,0}, f32[]) tuple(%bitcast.1, %all-reduce)
}
"""


def test_count_ops_reads_tuple_shapes_and_inlines_command_buffers():
  assert compiled_ops.count_ops(HLO) == {
    "fusion": 2,
    "custom-call": 2,
    "copy-start": 1,
    "copy-done": 1,
    "all-reduce": 1,
  }
  assert compiled_ops.total_ops(HLO) == 7
  assert compiled_ops.count_kinds(HLO) == {
    "fusion": 1,
    "dot": 2,
    "convolution": 1,
    "copy": 2,
    "other": 1,
  }
  # The entry's own instructions, as written (the call not inlined, nothing left out).
  assert compiled_ops.entry_opcodes(HLO)[:4] == [
    "parameter",
    "constant",
    "call",
    "get-tuple-element",
  ]


def test_count_ops_of_a_jitted_function_with_one_dot():
  f = lambda x, w: (jnp.tanh(x @ w).sum(), x + 1.0)
  compiled = jax.jit(f).lower(jnp.ones((8, 4)), jnp.ones((4, 3))).compile()
  counts = compiled_ops.count_ops(compiled)
  kinds = compiled_ops.count_kinds(compiled)
  assert counts["dot"] + counts["fusion"] >= 1
  assert kinds["dot"] == 1  # the product, alone or fused
  assert sum(kinds.values()) == sum(counts.values()) == compiled_ops.total_ops(compiled)
  assert set(counts) & compiled_ops.NO_WORK == set()


def test_ops_only_autoencoder_per_layer_column(step_time, capsys):
  results = step_time.main(
    ["--ops-only", "--workloads", "autoencoder", "--optimizers", "sgd,eva", "--no-save"]
  )
  r = results["autoencoder"]
  assert r["timed"] is False
  assert r["layers"] == {"captured": 8, "matrices": 8}  # the eight Dense layers
  sgd, eva = r["variants"]["sgd"]["ops"], r["variants"]["eva"]["ops"]
  assert sgd["total"] > 0 and eva["total"] > 0
  assert sum(sgd["by_kind"].values()) == sgd["total"]
  assert sum(sgd["by_opcode"].values()) == sgd["total"]
  assert sgd["by_kind"]["dot"] >= 8  # one forward product per layer at least
  assert sgd["layers"] == 8 and eva["layers"] == 8
  assert eva["extra"] == eva["total"] - sgd["total"]
  assert eva["extra_per_layer"] == pytest.approx((eva["total"] - sgd["total"]) / 8)
  assert eva["over_sgd"] == pytest.approx(eva["total"] / sgd["total"])
  assert sgd["extra_per_layer"] == 0
  out = capsys.readouterr().out
  row = next(line for line in out.splitlines() if line.startswith("eva "))
  assert f"{eva['extra_per_layer']:+.1f}" in row and str(eva["total"]) in row
  assert "ms/step" not in out  # nothing timed


def test_tiny_realistic_workloads_build_trace_and_compile(step_time):
  results = step_time.main(
    [
      "--ops-only",
      "--tiny",
      "--workloads",
      "resnet18,gpt-bf16",
      "--optimizers",
      "sgd,eva",
      "--no-save",
    ]
  )
  # ResNet-18: stem, 8 blocks x 2 convolutions, 3 projection shortcuts, the head.
  assert results["resnet18"]["layers"]["captured"] == 1 + 16 + 3 + 1
  assert results["resnet18"]["variants"]["sgd"]["ops"]["by_kind"]["convolution"] > 0
  # GPT: q, k, v, out and the two MLP layers per block (2 blocks), the head.
  assert results["gpt-bf16"]["layers"]["captured"] == 2 * 6 + 1
  for r in results.values():
    assert set(r["variants"]) == {"sgd", "eva"} and not r["errors"]


def test_every_registry_key_is_an_optimizer_with_its_period(step_time):
  assert step_time.ALL_OPTIMIZERS == (
    "sgd",
    "adamw",
    "eva",
    "eva-f",
    "eva-kln",
    "eva-s",
    "kfac",
    "kfac-authors",
    "foof",
    "shampoo",
    "eva+adamw",
    "eva-f+adamw",
    "muon",
  )
  from benchmarks.step_time_measure import period_of
  from examples.harness.optimizers import SPEC_BY_KEY

  periods = {k: period_of(SPEC_BY_KEY[k]) for k in step_time.ALL_OPTIMIZERS}
  assert periods == {
    "sgd": 1,
    "adamw": 1,
    "eva": 1,
    "eva-f": 1,
    "eva-kln": 1,
    "eva-s": 1,
    "kfac": 10,
    "kfac-authors": 10,
    "foof": 10,
    "shampoo": 10,
    "eva+adamw": 1,
    "eva-f+adamw": 1,
    "muon": 1,
  }
  args = step_time.parse_args(["--optimizers", "eva,eva_foof,eva_shampoo", "--no-save"])
  assert args.optimizer_names == ["sgd", "eva", "eva-f", "eva-s"]  # the former keys still work
  assert args.workload_names == ["autoencoder", "resnet", "transformer"]  # make bench's


def test_merge_prefers_timed_variants_and_keeps_registry_order(step_time):
  ops = lambda n: {"total": n, "layers": 2}
  untimed = {
    "results": {
      "w": {
        "timed": False,
        "errors": {"kfac": "boom"},
        "variants": {"eva": {"ops": ops(12)}, "sgd": {"ops": ops(10)}},
      }
    }
  }
  timed = {
    "results": {
      "w": {
        "timed": True,
        "errors": {},
        "variants": {"sgd": {"ops": ops(10), "median_ms": 1.0}, "adamw": {"ops": ops(11)}},
      }
    }
  }
  merged = step_time.merge_results([untimed, timed])["w"]
  assert list(merged["variants"]) == ["sgd", "adamw", "eva"]
  assert merged["variants"]["sgd"]["median_ms"] == 1.0
  assert merged["errors"] == {"kfac": "boom"}
  assert merged["timed"] is False  # eva and adamw were not timed
