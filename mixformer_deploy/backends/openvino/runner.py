"""OpenVINO runtime: an IR directory compiled for the CPU (or an OpenVINO GPU where one exists).

Why the execution precision is forced: OpenVINO's CPU plugin executes in bf16 by default on CPUs that
have it (AVX-512 BF16 / AMX), about 1e-2 relative off float32. An artifact is run as what it claims to
be - f32 execution - unless ``--runtime-option precision=bf16`` (or fp16) asks for reduced execution;
the runner's ``precision`` then says so, and parity judges it by that precision's tolerance.
The runtime itself sends no telemetry (only OpenVINO's converter and NNCF do, and neither runs here).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...optional import require
from ...errors import ArtifactError, MissingBackendError, UsageError, one_line
from .spec import BIN, XML, embedded_manifest, ir_files, verify_weights
from ..runner import Runner, packed

EXECUTION = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
CAPABILITY = {"bf16": "BF16", "fp16": "FP16"}
HINTS = {"latency": "LATENCY", "throughput": "THROUGHPUT"}


def _ov():
    return require("openvino", "openvino")


def cpu_capabilities(core) -> list[str]:
    """What OpenVINO's CPU plugin can execute here (FP32, BF16, FP16, INT8, ...)."""
    return [str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")]


def _device_name(core, device: str) -> str:
    d = (device or "cpu").lower()
    if d in ("cpu", "auto"):
        return "CPU"
    if d.startswith("gpu"):
        name = "GPU" + d[3:].replace(":", ".")
        if not any(x.startswith("GPU") for x in core.available_devices):
            raise MissingBackendError(f"OpenVINO sees no GPU here (devices: {', '.join(core.available_devices)})")
        return name
    raise UsageError(f"the openvino runtime runs on auto, cpu or gpu, not {device!r}")


class OpenVinoRunner(Runner):
    key = "openvino"
    devices = ("cpu", "gpu")
    dists = ("openvino",)
    extra = "openvino"
    option_help = {
        "precision": "execution precision: fp32 (default: IEEE float32), bf16 (CPUs with AVX-512 BF16 or AMX; "
                     "else exit 3) or fp16 (CPUs with AMX-FP16, GPUs)",
        "hint": "performance hint: latency (default) or throughput",
        "streams": "number of inference streams (an integer, or auto)",
    }

    def __init__(self, path: Path, device: str, threads: int | None, options: dict[str, str]):
        ov = _ov()
        self.path, self.threads = Path(path), threads
        xml, bin_ = ir_files(self.path)
        verify_weights(self.path)
        try:
            self.manifest = embedded_manifest(self.path) or {}
        except ArtifactError:  # a manifest that is not JSON: run the IR as what it is, fp32
            self.manifest = {}
        self.core = ov.Core()
        self.device = _device_name(self.core, device)
        self.config = self._config(options)
        try:
            self.model = self.core.read_model(str(xml), str(bin_))
        except Exception as e:
            raise ArtifactError(f"{self.path.name}: OpenVINO cannot read {XML} + {BIN} ({one_line(e, 200)})") from e
        self.compiled = self._compile(self.model)
        self.request = self.compiled.create_infer_request()
        self.n_outputs = len(self.model.outputs)
        self._debug = None

    @classmethod
    def load(cls, artifact, device="cpu", threads=None, options=None) -> "OpenVinoRunner":
        return cls(Path(artifact), device, threads, cls.check_options(options))

    def _config(self, options: dict[str, str]) -> dict:
        artifact_precision = self.manifest.get("precision", "fp32")
        precision = (options.get("precision") or "fp32").lower()
        if precision not in EXECUTION:
            raise UsageError(f"bad --runtime-option precision={precision}: choose fp32, bf16 or fp16")
        if precision in CAPABILITY and self.device == "CPU":
            caps = cpu_capabilities(self.core)
            if CAPABILITY[precision] not in caps:
                raise MissingBackendError(f"this CPU cannot execute {precision} in OpenVINO "
                                          f"(its capabilities: {', '.join(caps)})")
        hint = (options.get("hint") or "latency").lower()
        if hint not in HINTS:
            raise UsageError(f"bad --runtime-option hint={hint}: choose latency or throughput")
        config = {"INFERENCE_PRECISION_HINT": EXECUTION[precision], "PERFORMANCE_HINT": HINTS[hint]}
        streams = options.get("streams")
        if streams is not None:
            if not (streams.isdigit() and int(streams) > 0) and streams.upper() != "AUTO":
                raise UsageError(f"bad --runtime-option streams={streams}: a positive integer or auto")
            config["NUM_STREAMS"] = streams.upper()
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = int(self.threads)
        self.execution = precision
        self.hint = hint
        # what the outputs are judged as: reduced execution of a float artifact is that precision
        self.precision = precision if precision != "fp32" and artifact_precision in ("fp32", "fp16") \
            else artifact_precision
        return config

    def _compile(self, model):
        try:
            return self.core.compile_model(model, self.device, self.config)
        except Exception as e:
            raise ArtifactError(f"{self.path.name}: OpenVINO cannot compile it for {self.device} "
                                f"({one_line(e, 200)})") from e

    def run(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, dtype=np.float32)
        try:
            self.request.infer({0: x})
            return packed(np.array(self.request.get_output_tensor(i).data, dtype=np.float32, copy=True)
                          for i in range(self.n_outputs))
        except Exception as e:
            raise ArtifactError(f"{self.path.name}: inference failed on input {x.shape} ({one_line(e, 200)})") from e

    def run_stages(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Re-compile the IR with the recorded stage tensors exposed as extra outputs."""
        from ...deploy import to_reference_layout

        stages = self.manifest.get("stage_outputs") or {}
        tensors = stages.get("tensors") or {}
        if not tensors:
            return super().run_stages(batch)
        if self._debug is None:
            model = self.model.clone()
            try:
                model.add_outputs(list(tensors.values()))
            except Exception:  # a tensor name did not survive conversion: no localization, not a failure
                return super().run_stages(batch)
            self._debug = self._compile(model).create_infer_request()
        self._debug.infer({0: np.ascontiguousarray(batch, dtype=np.float32)})
        result = {port.get_any_name(): np.array(self._debug.get_output_tensor(i).data, dtype=np.float32, copy=True)
                  for i, port in enumerate(self.model.outputs)}
        for i, name in enumerate(tensors, start=self.n_outputs):
            result[name] = np.array(self._debug.get_output_tensor(i).data, dtype=np.float32, copy=True)
        return to_reference_layout(result, stages) if stages.get("layout") == "tokens" else result

    def profile(self, batch: np.ndarray, runs: int = 20) -> dict[str, dict]:
        """Per-op-type time (OpenVINO's performance counters, summed per executed layer type, averaged
        over ``runs``), in ms: where an IR's time goes."""
        from collections import defaultdict

        config = {**self.config, "PERF_COUNT": True}
        request = self.core.compile_model(self.model, self.device, config).create_infer_request()
        x = np.ascontiguousarray(batch, dtype=np.float32)
        for _ in range(3):
            request.infer({0: x})
        total: dict = defaultdict(lambda: {"ms": 0.0, "count": 0, "exec_types": set()})
        for _ in range(runs):
            request.infer({0: x})
            for info in request.profiling_info:
                if info.status != info.Status.EXECUTED:
                    continue
                entry = total[info.node_type]
                entry["ms"] += info.real_time.total_seconds() * 1e3 / runs
                entry["count"] += 1
                entry["exec_types"].add(info.exec_type)
        return {k: {"ms": v["ms"], "count": v["count"] // runs, "exec_types": sorted(v["exec_types"])}
                for k, v in sorted(total.items(), key=lambda kv: -kv[1]["ms"])}

    def describe(self) -> dict:
        ov = _ov()
        props = {}
        for key in ("INFERENCE_PRECISION_HINT", "PERFORMANCE_HINT", "NUM_STREAMS", "INFERENCE_NUM_THREADS"):
            try:
                v = self.compiled.get_property(key)
                props[key] = v.get_type_name() if hasattr(v, "get_type_name") else str(v)
            except Exception:  # noqa: BLE001 - a device without the property
                pass
        return {**super().describe(), "device": self.device.lower(), "execution_precision": self.execution, "hint": self.hint,
                "openvino": ov.get_version(), "compiled": props,
                "cpu": self._cpu_name() if self.device == "CPU" else None}

    def _cpu_name(self) -> str | None:
        try:
            return str(self.core.get_property("CPU", "FULL_DEVICE_NAME"))
        except Exception:  # noqa: BLE001
            return None

    @classmethod
    def status(cls, probe: bool = False) -> dict:
        base = super().status(probe)
        if not base["installed"] or not probe:
            return base
        try:
            ov = _ov()
            core = ov.Core()
            devices = list(core.available_devices)
            caps = cpu_capabilities(core) if "CPU" in devices else []
        except Exception as e:  # noqa: BLE001 - info reports, never fails
            return {**base, "can_run": False, "note": f"OpenVINO is installed but cannot start: {one_line(e, 200)}"}
        bf16 = "BF16" in caps
        return {**base, "devices": [d.lower() for d in devices], "bf16": bf16, "fp16": "FP16" in caps,
                "note": f"CPU execution precisions: fp32{', bf16' if bf16 else ''}{', fp16' if 'FP16' in caps else ''}"
                        f"{'' if bf16 else ' (no bf16 on this CPU)'}"}

    def close(self) -> None:
        self.request = self._debug = self.compiled = None
