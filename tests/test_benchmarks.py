"""benchmarks/profile.py's trace and HLO reading, on a hand-made trace and HLO text."""
from benchmarks import profile

_HLO = """HloModule jit_step

%fused_computation.7 (param_0: bf16[8,64]) -> bf16[8,64] {
  %param_0 = bf16[8,64]{1,0} parameter(0)
  ROOT %add.3 = bf16[8,64]{1,0} add(%param_0, %param_0), metadata={op_name="jit(step)/transpose(jvp(SPADNet))/stage3_hab2/lsac/add"}
}

ENTRY %main.9 (p: bf16[8,64]) -> bf16[8,64] {
  %p = bf16[8,64]{1,0} parameter(0)
  %conv.1 = bf16[8,64]{1,0} custom-call(%p), custom_call_target="__cudnn$convForward", metadata={op_name="jit(step)/jvp(SPADNet)/stage1_sr0/conv1/conv_general_dilated"}
  %loop_add_fusion.3 = bf16[8,64]{1,0} fusion(%conv.1), kind=kLoop, calls=%fused_computation.7
  ROOT %adam.2 = bf16[8,64]{1,0} multiply(%loop_add_fusion.3, %p), metadata={op_name="jit(step)/mul"}
}
"""


def _trace():
  meta = [
      {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
      {"ph": "M", "pid": 1, "tid": 7, "name": "thread_name", "args": {"name": "Stream #7(Compute)"}},
      {"ph": "M", "pid": 1, "tid": 8, "name": "thread_name", "args": {"name": "XLA Ops"}},
      {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/host:CPU"}},
  ]
  ev = lambda tid, ts, dur, name, op, pid=1: {"ph": "X", "pid": pid, "tid": tid, "ts": ts, "dur": dur,
                                               "name": name, "args": {"hlo_op": op}}
  return {"traceEvents": meta + [
      ev(7, 100.0, 30.0, "sm90_xmma_fprop", "conv.1"),
      ev(7, 140.0, 10.0, "loop_add_fusion_3", "command_buffer_12"),   # a kernel in a CUDA graph
      ev(7, 150.0, 5.0, "nvjet_sm90_tss_64x256", "command_buffer_12"),  # a library call in one
      ev(7, 160.0, 20.0, "adam", "adam.2"),
      ev(8, 100.0, 80.0, "conv.1", "conv.1"),                          # not a stream: not counted
      ev(3, 0.0, 999.0, "python", "conv.1", pid=2),                    # host: not counted
  ]}


def test_layer_of_names_direction_and_merges_block_indices():
  assert profile.layer_of("jit(step)/transpose(jvp(SPADNet))/stage3_hab0/lsac/cond/mul") == \
      "bwd stage3_hab#/lsac"
  assert profile.layer_of("jit(step)/jvp(SPADNet)/stage2_sr11/attention/reduce") == "fwd stage2_sr#/attention"
  assert profile.layer_of("jit(step)/mul") == "outside the model (loss, optimiser)"


def test_op_layers_reads_metadata_and_gives_fusions_their_computations_layer():
  layers = profile.op_layers(_HLO)
  assert layers["conv.1"] == "fwd stage1_sr#/conv1"
  assert layers["loop_add_fusion.3"] == "bwd stage3_hab#/lsac"
  assert layers["adam.2"] == "outside the model (loss, optimiser)"
  assert "p" not in layers


def test_device_op_times_counts_gpu_stream_kernels_only():
  times, span = profile.device_op_times(_trace())
  assert times == {"conv.1": 30.0, "loop_add_fusion.3": 10.0, "command_buffer_12": 5.0, "adam.2": 20.0}
  assert span == 80.0


def test_summarize_reports_busy_time_and_layers_per_step():
  text = profile.summarize(_trace(), _HLO, steps=2)
  assert text.startswith("device busy 0.03 ms/step over a traced span of 0.04 ms/step (2 steps)")
  assert "| conv.1 | fwd stage1_sr#/conv1 | 0.015 | 46.2% |" in text
  assert "| bwd stage3_hab#/lsac | 0.005 | 15.4% |" in text
