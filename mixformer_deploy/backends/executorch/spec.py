"""Reading ExecuTorch programs (``.pte``) through the ExecuTorch runtime, and our manifest, which a .pte
carries as a constant method (it has no free-form metadata field). Used by the executorch exporter and
its runner; executorch is imported only once the file looks like a program."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ...errors import ArtifactError, MissingBackendError, UsageError, one_line
from ...manifest import parse_embedded
from ...optional import require
from ..spec import FP32, INT8_PER_TENSOR, BackendSpec, Options, block_option, option

MANIFEST_METHOD = "mixformer_manifest"   # a method returning the manifest's UTF-8 JSON as a uint8 tensor
_SCALAR_TYPES = {0: "uint8", 1: "int8", 2: "int16", 3: "int32", 4: "int64", 5: "fp16", 6: "fp32", 7: "fp64",
                 11: "bool", 15: "bf16"}  # c10::ScalarType codes


def declared_size(data: bytes) -> int | None:
    """The file size a program's extended header declares (None without one): the end of its segments, else
    of the flatbuffer. The runtime refuses a shorter file too, but logs to stderr on its way."""
    eh = data[8:40]
    if len(eh) < 24 or eh[:4] != b"eh00":
        return None
    length, program, base = (int.from_bytes(eh[a:b], "little") for a, b in ((4, 8), (8, 16), (16, 24)))
    segments = int.from_bytes(eh[24:32], "little") if length > 24 and len(eh) >= 32 else 0
    return base + segments if base and segments else program


def load_program(path: Path):
    """The ExecuTorch runtime's Program for a .pte (ArtifactError when it is not one)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"artifact not found: {path}")
    data = path.read_bytes()
    if len(data) < 8 or data[4:8] != b"ET12":
        raise ArtifactError(f"{path.name}: not an ExecuTorch program (no ET12 header)")
    size = declared_size(data)
    if size is not None and len(data) < size:
        raise ArtifactError(f"{path.name}: truncated ExecuTorch program ({len(data)} of {size} bytes)")
    rt = require("executorch.runtime", "executorch")
    try:
        return rt.Runtime.get().load_program(data)
    except Exception as e:
        raise ArtifactError(f"{path.name}: ExecuTorch cannot load it ({one_line(e, 200)})") from e


def program_manifest(program, name: str) -> dict | None:
    """The manifest a loaded program carries (None when it has no manifest method)."""
    if MANIFEST_METHOD not in program.method_names:
        return None
    try:
        tensor = program.load_method(MANIFEST_METHOD).execute([])[0]
        text = bytes(tensor.numpy().astype("uint8").tobytes())
    except Exception as e:
        raise ArtifactError(f"{name}: unreadable embedded manifest ({one_line(e, 200)})") from e
    return parse_embedded(text, name)


def embedded_manifest(path: Path) -> dict | None:
    return program_manifest(load_program(path), Path(path).name)


def instruction_histogram(path: Path) -> tuple[dict, list]:
    """The forward plan's instructions: kernel calls by operator name, delegate calls by backend."""
    serialize = require("executorch.exir._serialize._program", "executorch")
    try:
        program = serialize.deserialize_pte_binary(Path(path).read_bytes()).program
    except Exception as e:
        raise ArtifactError(f"{Path(path).name}: cannot parse the program ({one_line(e, 200)})") from e
    plan = next((p for p in program.execution_plan if p.name == "forward"), program.execution_plan[0])
    hist: Counter = Counter()
    for chain in plan.chains:
        for ins in chain.instructions:
            args = ins.instr_args
            kind = type(args).__name__
            if kind == "KernelCall":
                op = plan.operators[args.op_index]
                hist[f"{op.name}.{op.overload}" if op.overload else op.name] += 1
            elif kind == "DelegateCall":
                hist[f"delegate:{plan.delegates[args.delegate_index].id}"] += 1
            else:
                hist[kind] += 1
    return dict(sorted(hist.items())), [d.id for d in plan.delegates]


def graph_form_option():
    """The option of every backend that lowers to XNNPACK (LiteRT too): which graph (backends/xnnpack.py)."""
    return option("xnnpack", "Graph lowered to XNNPACK: 'xnnpack' (the deploy form in XNNPACK's shapes, "
                  "default) or 'deploy' (the deploy form as is).", ("xnnpack", "deploy"))


@dataclass(frozen=True)
class ExecuTorchOptions(Options):
    graph_form: str = graph_form_option()
    block: str = block_option()


class ExecuTorchSpec(BackendSpec):
    key = "executorch"
    suffix = ".pte"
    extra = "executorch"
    runtime = "executorch"
    runners = {"executorch": "ExecuTorchRunner"}
    exporter_name = "ExecuTorchExporter"
    precisions = ("fp32", "int8")
    calibrated = ("int8",)
    tolerances = {"fp32": FP32, "int8": INT8_PER_TENSOR}
    Options = ExecuTorchOptions
    versions = ("executorch", "torchao")
    description = "ExecuTorch .pte with the XNNPACK delegate (Android and iOS CPUs)"
    title = "ExecuTorch"
    runs_here = "executorch (XNNPACK)"
    verified = "Linux x86 CPU"
    export_cost = "costly"
    capabilities = frozenset({"int8", "reproducible", "backbone", "inspect", "embedded_manifest", "phone_bench"})
    phone_bench = "executor_runner"   # the on-device benchmark binary (phone.py drives it)

    def check(self, options) -> None:
        super().check(options)
        if options.batch is None:
            raise UsageError("executorch exports a fixed batch (the .pte's memory is planned for one shape): "
                             "use --batch N")
        status = self.status()
        if not status["installed"]:
            raise MissingBackendError(f"{status['package']} is {status['note']}")

    def read_embedded(self, path: Path) -> dict | None:
        return embedded_manifest(path)

    def inspect(self, path: Path) -> dict:
        path = Path(path)
        program = load_program(path)
        meta = program.metadata("forward")

        def desc(infos):
            return [{"shape": list(t.sizes()), "dtype": _SCALAR_TYPES.get(int(t.dtype()), str(t.dtype()))}
                    for t in infos]

        inputs = desc(meta.input_tensor_meta(i) for i in range(meta.num_inputs()))
        outputs = desc(meta.output_tensor_meta(i) for i in range(meta.num_outputs()))
        instructions, delegates = instruction_histogram(path)
        manifest = program_manifest(program, path.name) or {}
        d = manifest.get("delegation") or {}
        return {
            "format": "executorch", "inputs": inputs, "outputs": outputs,
            "methods": sorted(program.method_names),
            "instructions": instructions, "delegates": delegates,
            "ops": {"delegated": d.get("delegated"), "non_delegated": d.get("non_delegated")},
            "delegated_ops": d.get("delegated_ops"), "non_delegated_ops": d.get("non_delegated_ops"),
            "compute_off_delegate": d.get("compute_off_delegate"),
            "graph_form": manifest.get("graph_form"), "max_rank": None,
            "precisions": {manifest.get("precision", "unknown"): d.get("delegated_ops")},
            "kept_fp32": (manifest.get("quantization") or {}).get("float32", []),
        }


SPEC = ExecuTorchSpec()
