"""How the latency model costs each kind of layer, and what the host calibration measures."""

from __future__ import annotations

import pytest

from hatcli.deploy.cpu import cpu_flags, exact_u8s8
from hatcli.deploy.onnx_graph import Layer
from hatcli.deploy.perf import conv_class, elementwise_us, layer_cost, utilisation
from hatcli.quant.march import load_march


def _conv(cin_per_group: int, cout: int = 32, group: int = 1, out: bool = False) -> Layer:
    return Layer(name="c", op_type="Conv", weight_shape=(cout, cin_per_group, 3, 3), attrs={"group": group},
                 output_shapes=[(1, cout, 10, 10)], input_shapes=[(1, cin_per_group * group, 10, 10)],
                 input_dtypes=["uint8"], output_dtype="uint8", macs=cout * 100 * cin_per_group * 9,
                 graph_output=out)


def test_layers_fall_in_kernel_classes() -> None:
    assert conv_class(_conv(3)) == "narrow"  # an RGB stem
    assert conv_class(_conv(16)) == "dense"
    assert conv_class(_conv(1, cout=32, group=32)) == "depthwise"
    assert conv_class(_conv(16, out=True)) == "output"


def test_a_class_without_its_own_figure_runs_at_the_dense_utilisation() -> None:
    bayes = load_march("bayes")
    assert bayes.cost.narrow_input_utilisation is None
    assert utilisation(_conv(3), bayes) == utilisation(_conv(16), bayes) == bayes.cost.utilisation
    host = load_march("host")
    assert utilisation(_conv(3), host) == host.cost.narrow_input_utilisation
    assert utilisation(_conv(16, out=True), host) == host.cost.output_conv_utilisation


def test_elementwise_and_table_layers_cost_per_output_element_where_the_march_says() -> None:
    add = Layer(name="a", op_type="Add", output_shapes=[(1, 64, 8, 8)], input_shapes=[(1, 64, 8, 8)] * 2,
                input_dtypes=["int8", "int8"], output_dtype="int8")
    sigmoid = Layer(name="s", op_type="Sigmoid", output_shapes=[(1, 64, 8, 8)], input_shapes=[(1, 64, 8, 8)],
                    input_dtypes=["int8"], output_dtype="uint8")
    host = load_march("host")
    assert elementwise_us(add, host) == pytest.approx(4096 * host.cost.elementwise_ns_per_element / 1e3)
    assert elementwise_us(sigmoid, host) == pytest.approx(4096 * host.cost.table_ns_per_element / 1e3)
    # a conv with a sigmoid the host cannot fuse pays the table; a BPU march fuses it for free
    fused = _conv(16)
    fused.fused = ["Sigmoid"]
    assert elementwise_us(fused, host) == pytest.approx(3200 * host.cost.table_ns_per_element / 1e3)
    assert elementwise_us(fused, load_march("nash_e")) == 0
    # SiLU, x * sigmoid(x), unfused: the table and then a quantized multiply
    fused.fused = ["SiLU"]
    per_element = host.cost.table_ns_per_element + host.cost.elementwise_ns_per_element
    assert elementwise_us(fused, host) == pytest.approx(3200 * per_element / 1e3)
    assert elementwise_us(fused, load_march("nash_e")) == 0
    assert layer_cost(add, load_march("bayes")).compute_us == 0  # BPU marches: memory-bound only


def test_u8s8_exactness_follows_the_cpu_flags(monkeypatch) -> None:
    import hatcli.deploy.cpu as cpu

    for machine, flags, exact in [("x86_64", {"avx2", "fma"}, False), ("x86_64", {"avx2", "avx_vnni"}, True),
                                  ("x86_64", {"avx512f", "avx512_vnni"}, True), ("aarch64", {"asimd", "asimddp"}, True),
                                  ("aarch64", {"asimd"}, False)]:
        cpu.exact_u8s8.cache_clear()
        monkeypatch.setattr(cpu.platform, "machine", lambda m=machine: m)
        monkeypatch.setattr(cpu, "cpu_flags", lambda f=flags: f)
        assert cpu.exact_u8s8() is exact, (machine, flags)
    cpu.exact_u8s8.cache_clear()


def test_this_machine_reports_its_flags() -> None:
    assert isinstance(exact_u8s8(), bool) and isinstance(cpu_flags(), set)


def test_the_host_benchmark_graphs_are_lowered_like_a_compiled_artifact(monkeypatch) -> None:
    import collections

    from hatcli.deploy import host_graphs, table_lowering
    from hatcli.deploy.compile import lower_graph

    def ops(model):
        return collections.Counter(node.op_type for node in lower_graph(model).graph.node)

    assert ops(host_graphs.residual_chain(2, 16, 8).model())["Cast"] == 4  # each add: two inputs cast to float
    # Each sigmoid becomes a table: ONNX Runtime's own (the Sigmoid is left for it to fuse) where
    # its 256 entries are checked equal to ours, else our Cast + Gather; never float arithmetic.
    tables = ops(host_graphs.table_chain(2, 16, 8).model())
    assert tables["Gather"] + tables["Sigmoid"] == 2
    monkeypatch.setattr(table_lowering, "RUNTIME_TABLE_OPS", {})
    assert ops(host_graphs.table_chain(2, 16, 8).model())["Gather"] == 2
    model, macs, outputs = host_graphs.stem_conv(32, kernel=7, cout=16)
    assert macs == outputs * 3 * 49 and outputs == 16 * 16 * 16
    head, _ = host_graphs.output_conv(16, 8, 10)
    assert ops(head)["ConvInteger"] == 1


def test_the_dense_rate_can_be_measured_again_to_see_whether_the_machine_changed_speed() -> None:
    from hatcli.deploy.host_profile import dense_gops

    assert dense_gops(1, seconds=0.05, size=8) > 0
