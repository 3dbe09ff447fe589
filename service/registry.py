"""The model registry: the verified artifact being served for each task.

Only what serves is loaded: while a joint (diagnosis) model serves, it answers /classify,
/segment and /diagnose, and the separate classification and segmentation versions are neither
loaded nor kept in memory; they load (at the next refresh) only should no joint model serve.

Training publishes candidates; what serves each task is the version last promoted in the model
directory's promotions record (`python -m training promote`, shared.promotion), or a pinned one
(the *_VERSION settings), and only if its manifest passes the gate (not a smoke run, metrics at or
above the GATE_MIN_* floors, an input the service can feed). At start-up that version is
verified, loaded, checked against its manifest and warmed up; if it cannot be, the version
promoted before it serves instead (a fallback, shown in /models and the metrics). A background
poller repeats this whenever the version folders, the record or a pin change: a new version is
loaded and warmed beside the one serving, then swapped in with a single reference assignment, so a
request keeps the model it started with. A version that fails verification, the gate, loading or
warm-up is refused, logged and counted, and whatever was serving stays; a task whose last
promotion is demoted stops being served.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from service.batching import Batcher, BatchingConfig, InFlight, example_input
from service.metrics import ServiceMetrics
from service.settings import available_cpus
from shared.calibration import Calibration
from shared.errors import (
    ArtifactError,
    ArtifactIntegrityError,
    ArtifactNotFoundError,
    ModelUnavailableError,
)
from shared.inference import (
    OUTPUT_CLASSES,
    RUNTIME_TORCHSCRIPT,
    RUNTIMES,
    check_output_shapes,
    declared_outputs,
    graph_output_names,
    load_module,
    warm_up,
)
from shared.labels import (
    TASK_DIAGNOSIS,
    TASKS,
)
from shared.onnx_runtime import OnnxSessions, onnxruntime_available, torchscript_outputs
from shared.preprocessing import Preprocessing
from shared.probe import read_probe
from shared.promotion import (
    PROMOTIONS_FILE,
    GateFloors,
    Promotions,
    gate_refusals,
    read_promotions,
)
from shared.store import ArtifactInfo, list_versions, resolve_artifact, verify_artifact
from shared.variants import GRAPH_CLASSIFY, GRAPH_FULL, RUNTIME_AGREEMENT_ATOL, RUNTIME_ONNX

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

INFERENCE_RUNTIMES = RUNTIMES  # "auto", "torchscript", "onnxruntime" (shared.inference)


_torch_threads: int | None = None  # TORCH_THREADS, applied when torch is first needed
_torch_configured = False


def configure_torch(threads: int) -> None:
    """Size torch's thread pools for a CPU host. Call once, before the first forward.

    The batcher's forward thread sets its own intra-op threads per forward (all of TORCH_THREADS
    for a lone request, TORCH_THREADS_BATCHED for a batch); `threads` sizes the warm-ups. torch
    is imported only when a model runs in TorchScript (a model served by ONNX Runtime does not
    need it in this process: its import alone is hundreds of MiB resident), so the settings are
    applied then, or now when it is already imported.
    """
    global _torch_threads, _torch_configured
    _torch_threads = threads
    _torch_configured = False
    if "torch" in sys.modules:
        _torch()


def _torch() -> Any:
    """torch, imported and configured (configure_torch) on first use."""
    global _torch_configured
    import torch

    if not _torch_configured:
        _torch_configured = True
        if _torch_threads is not None:
            torch.set_num_threads(_torch_threads)
        try:
            # Forwards run one at a time on the batcher's thread: inter-op parallelism only adds
            # threads.
            torch.set_num_interop_threads(1)
        except RuntimeError:  # already set in this process (a second app in the same process)
            pass
        # Denormal floats are orders of magnitude slower on x86 and change no prediction.
        torch.set_flush_denormal(True)
    return torch


def default_threads() -> int:
    """TORCH_THREADS as configured; else torch's own count when it is imported, else the CPUs
    this process may use."""
    if _torch_threads is not None:
        return _torch_threads
    if "torch" in sys.modules:
        return int(sys.modules["torch"].get_num_threads())
    return available_cpus()


@dataclass(frozen=True)
class LoadedModel:
    """A verified artifact, loaded, checked against its manifest and warmed up."""

    info: ArtifactInfo
    module: torch.jit.ScriptModule | None  # None when model.onnx serves (checked at load)
    preprocessing: Preprocessing
    input_shape: tuple[int, int, int]  # channels, height, width
    output_shape: tuple[int, ...]  # without the batch axis
    class_names: tuple[str, ...] = ()  # classification and diagnosis
    output_type: str = "logits"
    threshold: float = 0.5  # segmentation and diagnosis
    mask_shape: tuple[int, ...] = ()  # diagnosis only: the second output, without the batch axis
    calibration: Calibration = Calibration()  # of the class logits; identity when not declared
    onnx: OnnxSessions | None = None  # set when model.onnx runs the forwards
    # The classify-only graph (classify.onnx: encoder + class head) when the artifact carries one
    # that holds and agrees with model.onnx; /classify runs it instead of the whole network.
    classify_onnx: OnnxSessions | None = None
    loaded_at: float = field(default_factory=time.time)

    def runner(self, graph: str = GRAPH_FULL) -> OnnxSessions | None:
        """The ONNX Runtime forward of `graph` (None: the TorchScript module runs it)."""
        if graph == GRAPH_CLASSIFY and self.classify_onnx is not None:
            return self.classify_onnx
        return self.onnx

    def output_names(self, graph: str = GRAPH_FULL) -> tuple[str, ...]:
        """The names of what a forward of `graph` returns, in order: "classes", "masks" and,
        where the graph computes the quality check on its features, "quality"."""
        names = declared_outputs(self.info.manifest)
        runner = self.runner(graph)
        if runner is None:
            return names
        if runner is self.classify_onnx:
            names = (OUTPUT_CLASSES,)
        return graph_output_names(names, runner.output_names)

    @property
    def graphs(self) -> tuple[str, ...]:
        """The graphs this model can run: always the full one; classify-only when loaded."""
        return (GRAPH_FULL, GRAPH_CLASSIFY) if self.classify_onnx is not None else (GRAPH_FULL,)

    @property
    def runtime(self) -> str:
        """What runs the forwards: "onnxruntime" (model.onnx) or "torchscript" (model.pt)."""
        return RUNTIME_ONNX if self.onnx is not None else RUNTIME_TORCHSCRIPT

    @property
    def task(self) -> str:
        return self.info.task

    @property
    def version(self) -> str:
        return self.info.version

    @property
    def name(self) -> str:
        return self.info.name


def load_model(
    info: ArtifactInfo,
    lock: threading.Lock | None = None,
    runtime: str = "auto",
    threads: tuple[int, ...] = (),
    spin_us: int = 0,
    arena: bool = True,
) -> LoadedModel:
    """Load a verified artifact on the CPU, check it against its manifest and warm it up.

    `lock` serialises the warm-up forwards with the requests being served. `runtime` is
    INFERENCE_RUNTIME: with "auto" or "onnxruntime", an artifact whose
    manifest carries a validated model.onnx runs its forwards in ONNX Runtime, with a session
    for each of `threads` (default: torch's thread count) whose idle threads sleep between
    operators, and with `spin_us`, one more for `threads[0]` (a lone request's forward) whose
    idle threads spin that many microseconds first (service.batching); `arena=False` frees a
    forward's buffers when it ends (INFERENCE_ONNX_ARENA, shared.onnx_runtime). Raises
    ArtifactIntegrityError when the manifest is inconsistent, the file is not TorchScript, or a
    forward fails or returns another shape than the manifest declares.
    """
    if runtime not in INFERENCE_RUNTIMES:
        raise ValueError(f"runtime must be one of {INFERENCE_RUNTIMES}")
    manifest = info.manifest  # raises ManifestError (an ArtifactIntegrityError) when invalid
    problems = manifest.input_problems()
    if problems:
        raise ArtifactIntegrityError("; ".join(problems))
    onnx = classify = None
    if runtime != RUNTIME_TORCHSCRIPT:
        threads = threads or (default_threads(),)
        onnx = _onnx_forward(info, lock, threads, runtime, spin_us, arena)
        if onnx is not None:
            classify = _classify_forward(info, onnx, lock, threads, spin_us, arena)
    module = None
    if onnx is None:
        module = _torchscript_module(info, lock)
    classes, mask = manifest.output.classes, manifest.output.mask
    return LoadedModel(
        info=info,
        # model.onnx gave model.pt's answers: the TorchScript module is not loaded here
        module=module,
        preprocessing=manifest.preprocessing,
        input_shape=manifest.input.shape,
        output_shape=manifest.output.shapes[0],
        class_names=manifest.class_names,
        output_type=manifest.output.type,
        threshold=mask.threshold if mask else 0.5,
        mask_shape=mask.shape if classes and mask else (),
        calibration=classes.calibration if classes else Calibration(),
        onnx=onnx,
        classify_onnx=classify,
    )


def _torchscript_module(info: ArtifactInfo, lock: threading.Lock | None) -> torch.jit.ScriptModule:
    """model.pt, loaded in this process and warmed up (shared.inference). Raises
    ArtifactIntegrityError when it is not TorchScript, or a forward fails or returns another
    shape than the manifest declares."""
    _torch()  # configured before its first forward
    module = load_module(info)
    warm_up(module, info.manifest, lock)
    return module


def _onnx_forward(
    info: ArtifactInfo,
    lock: threading.Lock | None,
    threads: tuple[int, ...],
    runtime: str,
    spin_us: int = 0,
    arena: bool = True,
) -> OnnxSessions | None:
    """model.onnx in ONNX Runtime when the artifact carries one that holds and agrees with
    model.pt; None (TorchScript serves) otherwise, logged when it is not the expected case.

    model.pt's answers come from the artifact's probe (shared.probe: model.pt's outputs on fixed
    inputs, recorded when model.onnx was exported and covered by the manifest's checksums), or,
    for an artifact without one, from a short-lived process that runs model.pt
    (shared.onnx_runtime.torchscript_outputs): either way serving ONNX Runtime never imports
    torch here.
    """
    manifest = info.manifest
    variant = manifest.runtime(RUNTIME_ONNX)
    context = {"task": info.task, "version": info.version}
    why = None
    if variant is None:
        why = "the artifact carries no model.onnx"
    elif not variant.holds:
        why = f"its model.onnx was not validated within the bar (differences {variant.deltas})"
    elif not onnxruntime_available():
        why = "onnxruntime is not installed"
    if why:
        if runtime == RUNTIME_ONNX or (variant is not None and runtime == "auto"):
            log.warning(
                "%s version %s runs in TorchScript: %s", info.task, info.version, why,
                extra=context,
            )  # fmt: skip
        return None
    assert variant is not None
    shape = manifest.input.shape
    against = "model.pt"
    try:
        # spinning off but where a forward asks for it: an idle intra-op thread would
        # busy-wait on the cores the HTTP work needs
        forward = _sessions(info.runtime_path(variant), threads, spin_us, arena, shape, lock)
        with lock or _NO_LOCK:
            outputs = forward.run(np.zeros((1, *shape), np.float32), threads[0])
        expected = [(1, *s) for s in manifest.output.shapes]
        check_output_shapes([list(o.shape) for o in outputs[: len(expected)]], expected)
        if info.probe_path is not None:
            probe = read_probe(info.probe_path)
            batches, references = list(probe.inputs), list(probe.outputs)
            against = f"model.pt's answers recorded in {info.probe_path.name}"
        else:
            batches = [np.zeros((2, *shape), np.float32), example_input(shape, 2)]
            references = torchscript_outputs(info.model_path, batches, threads[0])
        worst = 0.0
        for batch, reference in zip(batches, references, strict=True):
            with lock or _NO_LOCK:
                # model.pt's outputs come first; a graph may add the quality score after them
                worst = max(worst, forward.disagreement(reference, batch))
    except Exception:
        log.exception(
            "%s version %s runs in TorchScript: its model.onnx could not be loaded or checked "
            "against %s", info.task, info.version, against, extra=context,
        )  # fmt: skip
        return None
    if not worst <= RUNTIME_AGREEMENT_ATOL:
        log.error(
            "%s version %s runs in TorchScript: its model.onnx disagrees with %s by %.3g",
            info.task, info.version, against, worst, extra=context,
        )  # fmt: skip
        return None
    log.info(
        "%s version %s runs in ONNX Runtime %s (model.onnx; agrees with %s within %.1g)",
        info.task, info.version, forward.version, against, worst, extra=context,
    )  # fmt: skip
    return forward


def _sessions(
    path: Path,
    threads: tuple[int, ...],
    spin_us: int,
    arena: bool,
    shape: tuple[int, ...],
    lock: threading.Lock | None,
) -> OnnxSessions:
    """The ONNX file's sessions for `threads`, and with `spin_us` the spinning one for
    `threads[0]`, warmed up by one forward (its first allocates its buffers)."""
    forward = OnnxSessions.from_file(
        path, threads, spinning=False, spin_us=spin_us or None, arena=arena
    )
    if spin_us:
        with lock or _NO_LOCK:
            forward.run(np.zeros((1, *shape), np.float32), threads[0], spinning=True)
    return forward


def _classify_forward(
    info: ArtifactInfo,
    full: OnnxSessions,
    lock: threading.Lock | None,
    threads: tuple[int, ...],
    spin_us: int = 0,
    arena: bool = True,
) -> OnnxSessions | None:
    """classify.onnx when the artifact carries one that holds and gives model.onnx's class
    logits (and quality score) on the warm-up inputs; None (logged) otherwise: the full graph
    then answers /classify too."""
    variant = info.manifest.runtime(RUNTIME_ONNX, GRAPH_CLASSIFY)
    context = {"task": info.task, "version": info.version}
    if variant is None:
        return None
    if not variant.holds:
        log.warning(
            "%s version %s: its classify.onnx was not validated within the bar (differences "
            "%s); /classify runs the whole network", info.task, info.version, variant.deltas,
            extra=context,
        )  # fmt: skip
        return None
    try:
        shape = info.manifest.input.shape
        forward = _sessions(info.runtime_path(variant), threads, spin_us, arena, shape, lock)
        wanted = forward.output_names
        worst = 0.0
        for batch in (np.zeros((2, *shape), np.float32), example_input(shape, 2)):
            with lock or _NO_LOCK:
                outputs = dict(zip(full.output_names, full.run(batch, threads[0]), strict=True))
                if not set(wanted) <= set(outputs):
                    raise ValueError(f"classify.onnx gives {wanted}, model.onnx {list(outputs)}")
                worst = max(worst, forward.disagreement([outputs[n] for n in wanted], batch))
    except Exception:
        log.exception(
            "%s version %s: its classify.onnx could not be loaded; /classify runs the whole "
            "network", info.task, info.version, extra=context,
        )  # fmt: skip
        return None
    if not worst <= RUNTIME_AGREEMENT_ATOL:
        log.error(
            "%s version %s: its classify.onnx disagrees with model.onnx by %.3g; /classify runs "
            "the whole network", info.task, info.version, worst, extra=context,
        )  # fmt: skip
        return None
    log.info(
        "%s version %s answers /classify with classify.onnx (agrees with model.onnx within %.1g)",
        info.task, info.version, worst, extra=context,
    )  # fmt: skip
    return forward


class _NoLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NO_LOCK = _NoLock()


class ModelRegistry:
    """Which model serves each task, and the one lock every forward goes through.

    The forwards of all tasks share one lock: each forward already uses all TORCH_THREADS, so
    running two at once would only make both slower (and the latency of each less predictable).
    """

    def __init__(
        self,
        model_dir: Path,
        pins: dict[str, str | None],
        metrics: ServiceMetrics,
        tasks: tuple[str, ...] = TASKS,
        gate: GateFloors | None = None,
        inference_runtime: str = "auto",
    ) -> None:
        if inference_runtime not in INFERENCE_RUNTIMES:
            raise ValueError(f"inference_runtime must be one of {INFERENCE_RUNTIMES}")
        self.model_dir = Path(model_dir)
        self.inference_runtime = inference_runtime
        self.tasks = tasks
        self.metrics = metrics
        self.gate = gate or GateFloors()
        self.inference_lock = threading.Lock()
        self._pins = {task: pins.get(task) or None for task in tasks}
        self._models: dict[str, LoadedModel] = {}
        # per task: the version folders, the pin and the promoted versions last acted on
        self._seen: dict[str, tuple[frozenset[str], str | None, tuple[str, ...] | None]] = {}
        self._names: dict[str, frozenset[str]] = {}
        self._refused: dict[str, set[tuple[str, str]]] = {task: set() for task in tasks}
        # {task: the promoted (or pinned) version} while another serves because it would not load
        self.fallback: dict[str, str] = {}
        # {task: {version: why}} for promoted (or pinned) versions the gate refuses
        self.gate_refused: dict[str, dict[str, str]] = {task: {} for task in tasks}
        self._record_state: str | None = None  # the last promotions-record problem logged
        self._refresh_lock = threading.Lock()

    # --- serving -----------------------------------------------------------------------------

    def get(self, task: str) -> LoadedModel:
        """The model serving `task`. Raises ModelUnavailableError when none is loaded."""
        model = self._models.get(task)
        if model is None:
            raise ModelUnavailableError(f"the {task} model is not loaded yet; try again later")
        return model

    def loaded(self) -> dict[str, LoadedModel]:
        """A snapshot {task: model} of what serves now."""
        return dict(self._models)

    def joint(self) -> LoadedModel | None:
        """The joint (diagnosis) model when one is loaded: it then answers every endpoint."""
        return self._models.get(TASK_DIAGNOSIS)

    @property
    def ready(self) -> bool:
        """Every endpoint can answer: a joint model is loaded, or a model for each other task.

        A registry that serves only some of the tasks (tests, a pinned single-task replica) is
        ready when all of its tasks are loaded.
        """
        if TASK_DIAGNOSIS in self.tasks and TASK_DIAGNOSIS in self._models:
            return True
        separate = [t for t in self.tasks if t != TASK_DIAGNOSIS]
        if not separate:
            return False
        return all(task in self._models for task in separate)

    # The batcher every forward goes through (service/batching.py); Runtime sets it from the
    # settings, and a registry built without one gets a batcher of one request per forward.
    batcher: Batcher | None = None

    def forward(
        self, model: LoadedModel, batch: np.ndarray, graph: str = GRAPH_FULL
    ) -> np.ndarray | tuple[np.ndarray, ...]:
        """Run the model (its `graph`: LoadedModel.graphs) on a (N, C, H, W) float32 batch,
        grouped with other waiting requests for the same model and graph into one forward;
        forwards run one at a time.

        Returns the arrays named by model.output_names(graph): a tuple when there are several
        (a joint model: class logits, mask logits[, quality score]), else one array.
        Raises ServiceOverloadedError when the queue is full, DeadlineExceededError when the
        request's deadline passes before its forward starts.
        """
        return self._batcher().submit(model, batch, graph)

    def analysing(self) -> InFlight:
        """`with registry.analysing():` around the analysis of a request (the batcher lets a
        forward spin only while it analyses one request, service.batching)."""
        return self._batcher().in_flight

    def _batcher(self) -> Batcher:
        if self.batcher is None:
            n = default_threads()
            config = BatchingConfig(max_batch_size=1, threads_alone=n, threads_batched=n)
            self.batcher = Batcher(config, self.metrics, self.inference_lock)
        return self.batcher

    # --- loading -----------------------------------------------------------------------------

    def _forward_threads(self) -> tuple[int, ...]:
        """The thread counts the batcher runs forwards with (an ONNX session is made for each)."""
        if self.batcher is None:
            return (default_threads(),)
        config = self.batcher.config
        return (config.threads_alone, config.threads_batched)

    def pins(self) -> dict[str, str | None]:
        """{task: pinned version or None}."""
        return dict(self._pins)

    def check_pins(self) -> None:
        """Fail fast on a pin to a version that does not exist (it would never load).

        Raises ArtifactNotFoundError naming the setting and the version.
        """
        for task, pin in self._pins.items():
            if pin and not (self.model_dir / task / pin).is_dir():
                raise ArtifactNotFoundError(
                    f"{task.upper()}_VERSION pins {task} version {pin}, which does not exist in "
                    f"{self.model_dir}; publish it or unset the pin"
                )

    def set_pin(self, task: str, version: str | None) -> None:
        """Pin `task` to a version (None: the newest); takes effect at the next refresh."""
        self._pins[task] = version or None

    def promoted(self) -> dict[str, str | None]:
        """{task: the version the promotions record says serves it, or None}."""
        record = self._read_record()
        return {task: record.serving(task) if record else None for task in self.tasks}

    def refresh(self) -> None:
        """Load what should serve each task, if that changed since the last call."""
        with self._refresh_lock:
            record = self._read_record()
            # the joint model first: while it serves, it answers every endpoint and the separate
            # tasks' models are not loaded (nor kept: only what serves takes memory)
            for task in sorted(self.tasks, key=lambda t: t != TASK_DIAGNOSIS):
                try:
                    if task != TASK_DIAGNOSIS and self.joint() is not None:
                        self._stand_down(task)
                        continue
                    self._refresh_task(task, record.stack(task) if record else None)
                except Exception:  # never let one task's surprise stop the poller
                    self.metrics.reloads.labels(task, "error").inc()  # feeds the load alert
                    log.exception("model refresh failed", extra={"task": task})
        self.metrics.ready.set(1 if self.ready else 0)

    def _read_record(self) -> Promotions | None:
        """The promotions record, or None (logged once per problem) when missing or unreadable."""
        try:
            record = read_promotions(self.model_dir)
            problem = None if record else f"no {PROMOTIONS_FILE}"
        except ArtifactError as exc:
            record, problem = None, exc.message
        if problem and problem != self._record_state:
            log.error(
                "%s in %s: no version is promoted, so none serves (what serves keeps serving); "
                "promote one with: python -m training promote <task> <version> --model-dir %s",
                problem, self.model_dir, self.model_dir,
                extra={"reason": "promotions_record"},
            )  # fmt: skip
        self._record_state = problem
        return record

    def _refresh_task(self, task: str, promoted: tuple[str, ...] | None) -> None:
        """Serve the newest promoted version of `task` (or its pin) that passes the gate and
        loads; `promoted` is None when the promotions record is missing or unreadable."""
        names = frozenset(list_versions(self.model_dir, task))
        pin = self._pins[task]
        if self._seen.get(task) == (names, pin, promoted):
            return  # nothing was published, removed, promoted, demoted or re-pinned
        previous_names = self._names.get(task, frozenset())
        if task in self._seen and self._seen[task][2] != promoted:
            self.metrics.promotion_changes.labels(task).inc()
            log.info(
                "promotions of %s changed: %s",
                task, list(promoted or ()), extra={"task": task, "promoted": list(promoted or ())},
            )  # fmt: skip
        self._seen[task] = (names, pin, promoted)
        self._names[task] = names
        current = self._models.get(task)
        keeping = f"version {current.version} keeps serving" if current else "/readyz stays 503"

        for version in sorted(names - previous_names):
            try:
                verify_artifact(self.model_dir, task, version)
            except ArtifactError as exc:
                self.metrics.reloads.labels(task, "rejected").inc()
                log.error(
                    "refusing %s version %s: %s; %s",
                    task, version, exc.message, keeping,
                    extra={"task": task, "version": version, "reason": exc.code},
                )  # fmt: skip

        if pin:
            wanted: tuple[str, ...] = (pin,)  # a pin needs no promotion, but passes the gate
        elif promoted is None:
            return  # no readable record (logged once): keep what serves
        else:
            wanted = tuple(reversed(promoted))  # the last promoted first, then its fallbacks
        if not wanted:
            if current is not None:
                self._unload(task, current)
            if task == TASK_DIAGNOSIS or self.joint() is not None:
                # a registry of separate models has no joint one; a joint one needs no others
                log.info("no %s version is promoted in %s", task, self.model_dir)
            else:
                log.error(
                    "no usable %s model in %s: none is promoted (python -m training promote "
                    "%s <version>); %s",
                    task, self.model_dir, task, keeping, extra={"task": task},
                )  # fmt: skip
            return
        candidates = []
        for version in wanted:
            try:
                candidates.append(resolve_artifact(self.model_dir, task, version))
            except ArtifactError as exc:
                log.error(
                    "no usable %s model%s in %s: %s version %s: %s; %s",
                    task, f" (pinned {pin})" if pin else "", self.model_dir, "pinned" if pin
                    else "promoted", version, exc.message, keeping,
                    extra={"task": task, "version": version, "reason": exc.code},
                )  # fmt: skip
        for info in candidates:
            if current and (current.version, current.info.sha256) == (info.version, info.sha256):
                break  # what serves is already the first promoted version that loads
            if (info.version, info.sha256) in self._refused[task]:
                continue  # already refused; try the one promoted before it
            if self._passes_gate(task, info, keeping) and self._load(task, info, current, keeping):
                break
        self._note_fallback(task, wanted[0])

    def _passes_gate(self, task: str, info: ArtifactInfo, keeping: str) -> bool:
        """True when `info` passes the gate; else refused, counted per reason and logged.

        A manifest that does not even read passes here and fails (counted) at load.
        """
        try:
            refusals = gate_refusals(info.manifest, self.gate, task)
        except ArtifactError:
            return True
        if not refusals:
            self.gate_refused[task].pop(info.version, None)
            return True
        self._refused[task].add((info.version, info.sha256))
        why = "; ".join(r.message for r in refusals)
        self.gate_refused[task][info.version] = why
        for refusal in refusals:
            self.metrics.gate_refusals.labels(task, refusal.reason).inc()
        log.error(
            "the gate refuses %s version %s: %s; %s",
            task, info.version, why, keeping,
            extra={"task": task, "version": info.version, "reason": "gate",
                   "gate": [r.reason for r in refusals]},
        )  # fmt: skip
        return False

    def _stand_down(self, task: str) -> None:
        """`task` is answered by the joint model: unload its own model if one is loaded, and
        forget what was seen of its versions, so that it loads again should the joint model
        stop serving."""
        self._seen.pop(task, None)
        current = self._models.pop(task, None)
        if current is None:
            return
        self.metrics.model_info.remove(task, current.name, current.version, current.info.sha256)
        self.metrics.model_runtime.remove(task, current.version, current.runtime)
        self.metrics.fallback.labels(task).set(0)
        self.fallback.pop(task, None)
        log.info(
            "unloaded %s version %s: the joint model answers %s",
            task, current.version, task, extra={"task": task, "version": current.version},
        )  # fmt: skip

    def _unload(self, task: str, current: LoadedModel) -> None:
        """Stop serving `task`: its version was demoted and nothing else is promoted."""
        self._models.pop(task, None)
        self.metrics.model_info.remove(task, current.name, current.version, current.info.sha256)
        self.metrics.model_runtime.remove(task, current.version, current.runtime)
        self.metrics.fallback.labels(task).set(0)
        self.fallback.pop(task, None)
        log.warning(
            "no longer serving %s version %s: no %s version is promoted any more",
            task, current.version, task, extra={"task": task, "version": current.version},
        )  # fmt: skip

    def _note_fallback(self, task: str, wanted: str) -> None:
        serving = self._models.get(task)
        older = serving is not None and serving.version != wanted
        self.metrics.fallback.labels(task).set(1 if older else 0)
        if older and self.fallback.get(task) != wanted:
            log.warning(
                "serving %s version %s: the %s one, %s, could not be served",
                task, serving.version, "pinned" if self._pins[task] else "promoted", wanted,
                extra={"task": task, "version": serving.version, "newest": wanted},
            )  # fmt: skip
        if older:
            self.fallback[task] = wanted
        else:
            self.fallback.pop(task, None)

    def _load(
        self, task: str, info: ArtifactInfo, current: LoadedModel | None, keeping: str
    ) -> bool:
        """Load `info` and make it serve `task`; False (counted, logged) when it fails."""
        started = time.perf_counter()
        try:
            config = self.batcher.config if self.batcher is not None else BatchingConfig()
            model = load_model(
                info,
                self.inference_lock,
                self.inference_runtime,
                self._forward_threads(),
                config.spin_us,
                config.onnx_arena,
            )
        except ArtifactError as exc:
            self._refused[task].add((info.version, info.sha256))
            self.metrics.reloads.labels(task, "failed").inc()
            log.error(
                "refusing %s version %s: %s; %s",
                task, info.version, exc.message, keeping,
                extra={"task": task, "version": info.version, "reason": exc.code},
            )  # fmt: skip
            return False
        self._models[task] = model  # the swap: one reference assignment
        if current:
            self.metrics.model_info.remove(task, current.name, current.version, current.info.sha256)
            self.metrics.model_runtime.remove(task, current.version, current.runtime)
        self.metrics.model_info.labels(task, model.name, model.version, info.sha256).set(1)
        self.metrics.model_runtime.labels(task, model.version, model.runtime).set(1)
        self.metrics.reloads.labels(task, "loaded").inc()
        log.info(
            "serving %s version %s (%s, %s), loaded and warmed up in %.2f s%s",
            task, model.version, model.name, model.runtime, time.perf_counter() - started,
            f", replacing {current.version}" if current else "",
            extra={"task": task, "version": model.version, "previous": current and current.version},
        )  # fmt: skip
        return True


class ReloadPoller:
    """Calls registry.refresh() every `interval` seconds on a daemon thread."""

    def __init__(self, registry: ModelRegistry, interval: float) -> None:
        self.registry = registry
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="model-reload", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.registry.refresh()
