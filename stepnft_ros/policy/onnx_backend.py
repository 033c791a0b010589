"""ONNX export of a FlowVLA and an onnxruntime policy with FlowPolicy's interface (no ROS).

An export directory holds two graphs with dynamic batch axes and a manifest:

    prefix.onnx        state (B, S) float32 normalized, images (B, C, 3, h, w) uint8,
                       input_ids / attention_mask (B, T) int64   ->  prefix (B, P, d), prefix_pad (B, P) bool
    velocity.onnx      x (B, H, D), tau (B,), prefix, prefix_pad  ->  v (B, H, D)
    export.safetensors normalization statistics; its header metadata names the source checkpoint,
                       its weights version, the PolicyConfig and the sha256 of both graphs

Only the inputs the config uses exist (no `images` for a state policy, ...). The text tokenizer
runs in Python, outside the graphs. Normalization lives in exactly one place: OnnxFlowPolicy, in
Python, from the manifest's statistics; the graphs see normalized states and actions only. The
ODE/SDE math is the project's sampler (`sample_chunk`) with onnxruntime as its velocity function,
so both backends draw the same noise from the same torch generator.

Hot swap: the graphs are traced once (torch.export, seconds) without optimization; new weights
go into that template's initializers, which are the parameters under their own names, and only
the optimizer and onnxruntime's session set-up run again (well under a second for these sizes).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import safetensors
import safetensors.torch
import torch
from torch import nn

from stepnft_ros.atomic import atomic_publish_dir
from stepnft_ros.policy.checkpoint import WEIGHTS_FILE, CheckpointError, load_checkpoint
from stepnft_ros.policy.config import PolicyConfig
from stepnft_ros.policy.modeling import FlowVLA
from stepnft_ros.policy.policy import FlowPolicy, PolicyOutput, SamplingPolicy, check_sampling_mode
from stepnft_ros.policy.sampler import check_sde_noise, check_step_noise_correlation
from stepnft_ros.policy.types import Observation, stack_observations

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

PREFIX_FILE = 'prefix.onnx'
VELOCITY_FILE = 'velocity.onnx'
MANIFEST_FILE = 'export.safetensors'
FORMAT = 'stepnft_ros.onnx/1'
OPSET = 18
GRAPH_FILES = (PREFIX_FILE, VELOCITY_FILE)
VELOCITY_INPUTS = ['x', 'tau', 'prefix', 'prefix_pad']
_GRAPH_MODULES = {PREFIX_FILE: ('encoder.', 'prefix_encoder'), VELOCITY_FILE: ('expert.', 'action_expert')}
BACKENDS = ('torch', 'onnxruntime')
SWAP_TOLERANCE = 1e-3  # float32 kernels agree to ~1e-5; wrong weights differ by O(1)
_EXAMPLE_BATCH = 2  # torch.export specializes size-1 dims: trace with 2 to keep the batch axis dynamic


class OnnxExportError(CheckpointError):
    """An ONNX export that is missing, corrupt, or cannot be produced or loaded."""


# ---- export ----------------------------------------------------------------------------------

class _PrefixGraph(nn.Module):
    """PrefixEncoder on tensors: the tokenizer and the state normalization stay outside the graph."""

    def __init__(self, model: FlowVLA) -> None:
        super().__init__()
        self.encoder = model.prefix_encoder

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        enc, named = self.encoder, dict(zip(self.input_names, inputs, strict=True))
        b = inputs[0].shape[0]
        # Token order as in PrefixEncoder.forward: state, camera patches, instruction
        # (tests/test_onnx.py compares both encoders, so a drift between them fails there).
        tokens = []
        if enc.state is not None:
            tokens.append(enc.state(named['state']).unsqueeze(1))
        if enc.vision is not None:
            tokens.append(enc.vision(named['images']))
        masks = [torch.zeros(b, t.shape[1], dtype=torch.bool, device=t.device) for t in tokens]
        if enc.text is not None:
            hidden = enc.text.encoder(input_ids=named['input_ids'],
                                      attention_mask=named['attention_mask']).last_hidden_state
            tokens.append(enc.text.project(hidden))
            masks.append(named['attention_mask'] == 0)
        prefix, pad = torch.cat(tokens, 1), torch.cat(masks, 1)
        if enc.mixer is not None:
            prefix = enc.mixer(prefix, src_key_padding_mask=pad)
        return prefix, pad

    @property
    def input_names(self) -> list[str]:
        return prefix_input_names(self.encoder.state is not None, self.encoder.vision is not None,
                                  self.encoder.text is not None)


class _VelocityGraph(nn.Module):
    def __init__(self, model: FlowVLA) -> None:
        super().__init__()
        self.expert = model.action_expert

    def forward(self, x: torch.Tensor, tau: torch.Tensor, prefix: torch.Tensor,
                prefix_pad: torch.Tensor) -> torch.Tensor:
        return self.expert(x, tau, prefix, prefix_pad)


def prefix_input_names(state: bool, vision: bool, language: bool) -> list[str]:
    return ['state'] * state + ['images'] * vision + ['input_ids', 'attention_mask'] * language


def make_tokenizer(cfg: PolicyConfig):
    """The instruction tokenizer TextEncoder builds for `cfg` (it never enters the graph)."""
    import transformers

    if cfg.text_encoder_path:
        return transformers.AutoTokenizer.from_pretrained(cfg.text_encoder_path, local_files_only=True)
    return transformers.ByT5Tokenizer()


def tokenize(tokenizer, instructions: Sequence[str], cfg: PolicyConfig) -> dict[str, np.ndarray]:
    """The same call TextEncoder.forward makes, as int64 numpy arrays."""
    tok = tokenizer(list(instructions), padding=True, truncation=True, max_length=cfg.max_text_tokens,
                    return_tensors='np')
    return {'input_ids': tok['input_ids'].astype(np.int64), 'attention_mask': tok['attention_mask'].astype(np.int64)}


def _example_prefix_inputs(model: FlowVLA, tokenizer) -> tuple[torch.Tensor, ...]:
    cfg, b = model.config, _EXAMPLE_BATCH
    g = torch.Generator().manual_seed(0)
    inputs = []
    if cfg.state_dim:
        inputs.append(torch.randn(b, cfg.state_dim, generator=g))
    if cfg.camera_names:
        inputs.append(torch.randint(0, 256, (b, len(cfg.camera_names), 3, cfg.image_size, cfg.image_size),
                                    generator=g, dtype=torch.uint8))
    if cfg.use_language:
        # Two lengths, both > 1 token, so the text axis stays dynamic too.
        tok = tokenize(tokenizer, ['pick up the cube', 'stack it'], cfg)
        inputs += [torch.from_numpy(tok['input_ids']), torch.from_numpy(tok['attention_mask'])]
    return tuple(inputs)


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporter's and optimizer's internal deprecation notes and progress chatter."""
    loggers = [logging.getLogger(n) for n in ('onnxscript', 'torch.onnx', 'torch.export')]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)
        warnings.filterwarnings('ignore', message='.*axis name', category=UserWarning)
        warnings.filterwarnings('ignore', category=DeprecationWarning)
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def _trace(module: nn.Module, args: tuple[torch.Tensor, ...], input_names: list[str], output_names: list[str],
           dynamic: dict[str, dict[int, Any]], variadic: bool = False) -> onnx.ModelProto:
    """The unoptimized graph, whose initializers are the module's parameters under their own names.

    The dynamo exporter (torch.export): the TorchScript one bakes attention reshapes to the
    example's batch size. Optimization is a separate step (_finalize), so a hot swap can put
    new weights into this template and skip the (seconds-long) trace.
    """
    import onnx_ir
    shapes = tuple(dynamic.get(n, {}) for n in input_names)
    with torch.no_grad(), _quiet_exporter():
        program = torch.onnx.export(module.eval(), args, None, input_names=input_names, output_names=output_names,
                                    dynamic_shapes=(shapes,) if variadic else shapes, opset_version=OPSET,
                                    dynamo=True, optimize=False, verbose=False)
    return onnx_ir.to_proto(program.model)


def _graph_weights(model: FlowVLA) -> dict[str, dict[str, np.ndarray]]:
    """Per graph file: initializer name -> value, from the model's state dict."""
    out = {}
    for graph, (prefix, module) in _GRAPH_MODULES.items():
        sub = getattr(model, module)
        out[graph] = {prefix + k: v.detach().cpu().numpy() for k, v in sub.state_dict().items()}
    return out


def _finalize(template: onnx.ModelProto, weights: dict[str, np.ndarray]) -> bytes:
    """Template + weights -> the optimized, checked graph, serialized."""
    import onnx
    import onnx_ir
    import onnxscript.optimizer
    from onnx import numpy_helper

    model = onnx.ModelProto()
    model.CopyFrom(template)
    # Unoptimized, the exporter keeps every parameter the graph uses as an initializer under its
    # own name; one it does not use has none (OnnxFlowPolicy also checks each swap against torch).
    for init in model.graph.initializer:
        if init.name in weights:
            init.CopyFrom(numpy_helper.from_array(weights[init.name], init.name))
    ir_model = onnx_ir.from_proto(model)
    with _quiet_exporter():
        onnxscript.optimizer.optimize_ir(ir_model)  # what torch.onnx.export(optimize=True) runs
    model = onnx_ir.to_proto(ir_model)
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def _example_inputs(model: FlowVLA) -> dict[str, tuple]:
    cfg, b = model.config, _EXAMPLE_BATCH
    prefix_graph = _PrefixGraph(model)
    prefix_args = _example_prefix_inputs(model, model.prefix_encoder.text.tokenizer if cfg.use_language else None)
    with torch.no_grad():
        prefix, pad = prefix_graph(*prefix_args)
    return {PREFIX_FILE: prefix_args,
            VELOCITY_FILE: (torch.randn(b, cfg.horizon, cfg.action_dim), torch.rand(b), prefix, pad)}


def trace_graphs(model: FlowVLA) -> dict[str, onnx.ModelProto]:
    """Unoptimized prefix and velocity graphs of `model` with dynamic batch (and text) axes."""
    cfg = model.config
    batch = torch.export.Dim('batch', min=1)
    prefix_graph = _PrefixGraph(model)
    dyn_prefix: dict[str, dict[int, Any]] = {n: {0: batch} for n in prefix_graph.input_names}
    length = {}
    if cfg.use_language:
        text = torch.export.Dim('text', min=1, max=cfg.max_text_tokens)
        dyn_prefix['input_ids'] = dyn_prefix['attention_mask'] = {0: batch, 1: text}
        length = {1: torch.export.Dim('prefix_len', min=1)}  # the prefix grows with the instruction
    args = _example_inputs(model)
    return {
        PREFIX_FILE: _trace(prefix_graph, args[PREFIX_FILE], prefix_graph.input_names, ['prefix', 'prefix_pad'],
                            dyn_prefix, variadic=True),
        VELOCITY_FILE: _trace(_VelocityGraph(model), args[VELOCITY_FILE], VELOCITY_INPUTS, ['v'],
                              {'x': {0: batch}, 'tau': {0: batch}, 'prefix': {0: batch, **length},
                               'prefix_pad': {0: batch, **length}}),
    }


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


def export_onnx(model: FlowVLA | str | Path, out_dir: str | Path, source: str = '',
                weights_version: int | None = None) -> Path:
    """Export a FlowVLA (or a checkpoint directory) to `out_dir`, made visible in one rename.

    `source` / `weights_version` are recorded in the manifest (read from the checkpoint when a
    path is given). Raises OnnxExportError if `out_dir` exists or the export fails the checker.
    """
    out_dir = Path(out_dir)
    metadata: dict[str, Any] = {}
    if isinstance(model, (str, Path)):
        source = source or str(Path(model).resolve())
        model, metadata = load_checkpoint(model)
        metadata['source_sha256'] = _sha256(Path(source) / WEIGHTS_FILE)
    if not isinstance(model, FlowVLA):
        raise OnnxExportError(f'ONNX export covers FlowVLA checkpoints only, not '
                              f'{getattr(model, "kind", type(model).__name__)}')
    if weights_version is None:
        weights_version = int(metadata.get('weights_version', 0))
    if out_dir.exists():
        raise OnnxExportError(f'{out_dir} already exists: choose another output directory or remove it')
    if model.training or any(p.device.type != 'cpu' for p in model.parameters()):
        model = copy.deepcopy(model).to('cpu').eval()  # leave the caller's model as it is
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f'.{out_dir.name}.', suffix='.tmp', dir=out_dir.parent))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; the export is an ordinary shared directory
        weights = _graph_weights(model)
        for name, template in trace_graphs(model).items():
            (staging / name).write_bytes(_finalize(template, weights[name]))
        norm = model.normalizer
        header = {'format': FORMAT, 'config': model.config.to_json(), 'source_checkpoint': source,
                  'weights_version': str(weights_version), 'source_sha256': metadata.get('source_sha256', ''),
                  'opset': str(OPSET), 'torch': torch.__version__,
                  'graphs': json.dumps({n: _sha256(staging / n) for n in GRAPH_FILES})}
        tensors = {'state_mean': norm.state_mean, 'state_std': norm.state_std,
                   'action_mean': norm.action_mean, 'action_std': norm.action_std}
        safetensors.torch.save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                                    str(staging / MANIFEST_FILE), metadata=header)
        atomic_publish_dir(staging, out_dir)  # fsyncs every file, then one rename
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(err, FileExistsError):
            raise OnnxExportError(f'{out_dir} already exists: choose another output directory or remove it') from None
        if isinstance(err, OnnxExportError) or not isinstance(err, Exception):
            raise
        raise OnnxExportError(f'ONNX export to {out_dir} failed: {err}') from err
    return out_dir


# ---- runtime ---------------------------------------------------------------------------------

def read_manifest(export_dir: str | Path) -> tuple[PolicyConfig, dict[str, str], dict[str, torch.Tensor]]:
    """Config, header metadata and normalization statistics of an export; checks both graphs' sha256."""
    export_dir = Path(export_dir)
    path = export_dir / MANIFEST_FILE
    if not path.is_file():
        raise OnnxExportError(f'no ONNX export at {export_dir} ({MANIFEST_FILE} missing)')
    try:
        with safetensors.safe_open(str(path), framework='pt') as f:
            header = f.metadata() or {}
            stats = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as err:
        raise OnnxExportError(f'{path}: not a readable safetensors file ({err})') from err
    if header.get('format') != FORMAT:
        raise OnnxExportError(f'{path}: format {header.get("format")!r}, expected {FORMAT!r}')
    try:
        cfg = PolicyConfig.from_dict(json.loads(header['config']))
        graphs = json.loads(header['graphs'])
    except (KeyError, ValueError, TypeError) as err:
        raise OnnxExportError(f'{path}: invalid header ({err})') from err
    for name, digest in graphs.items():
        graph = export_dir / name
        if not graph.is_file():
            raise OnnxExportError(f'{graph} is missing')
        if _sha256(graph) != digest:
            raise OnnxExportError(f'{graph} is corrupt (sha256 differs from the one recorded at export)')
    return cfg, header, stats


def select_providers(device: str) -> list:
    """onnxruntime execution providers for `device`: 'cpu', 'cuda[:N]' or 'auto' (CUDA if present).

    CUDA needs the onnxruntime-gpu wheel; without it 'cuda' falls back to the CPU (logged).
    """
    import onnxruntime as ort

    kind, _, index = device.partition(':')
    if kind not in ('cpu', 'cuda', 'auto'):
        raise ValueError(f"device must be 'cpu', 'cuda[:N]' or 'auto' for the onnxruntime backend, got {device!r}")
    if kind != 'cpu':
        if 'CUDAExecutionProvider' in ort.get_available_providers():
            return [('CUDAExecutionProvider', {'device_id': int(index or 0)}), 'CPUExecutionProvider']
        if kind == 'cuda':
            log.warning('onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu): using the CPU')
    return ['CPUExecutionProvider']


class _Sessions:
    """The two onnxruntime sessions of one set of graphs, with the config and statistics they need."""

    def __init__(self, config: PolicyConfig, stats: dict[str, torch.Tensor], graphs: dict[str, bytes | Path],
                 providers: list, threads: int, tokenizer=None) -> None:
        import onnxruntime as ort

        self.config = config
        if tokenizer is None and config.use_language:
            tokenizer = make_tokenizer(config)
        self.tokenizer = tokenizer
        self.state_mean, self.state_std = stats['state_mean'], stats['state_std']
        self.action_mean, self.action_std = stats['action_mean'], stats['action_std']
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: no per-node placement chatter
        self.prefix_inputs = prefix_input_names(bool(config.state_dim), bool(config.camera_names),
                                                config.use_language)
        self.sessions = {}
        for name, inputs in ((PREFIX_FILE, self.prefix_inputs), (VELOCITY_FILE, VELOCITY_INPUTS)):
            graph = graphs[name]
            where = graph if isinstance(graph, Path) else f'{name} (in memory)'
            try:
                session = ort.InferenceSession(str(graph) if isinstance(graph, Path) else graph, options,
                                               providers=providers)
            except Exception as err:  # onnxruntime raises its own Fail/InvalidProtobuf/... types
                raise OnnxExportError(f'{where}: onnxruntime cannot load it ({err})') from err
            got = [i.name for i in session.get_inputs()]
            if got != inputs:
                raise OnnxExportError(f'{where}: inputs {got}, expected {inputs} for its config')
            self.sessions[name] = session
        self.providers = self.sessions[VELOCITY_FILE].get_providers()

    @classmethod
    def from_dir(cls, export_dir: Path, providers: list, threads: int) -> _Sessions:
        config, _, stats = read_manifest(export_dir)
        return cls(config, stats, {n: export_dir / n for n in GRAPH_FILES}, providers, threads)


class OnnxFlowPolicy(SamplingPolicy):
    """FlowPolicy's interface (infer_batch, infer, reset, mode, a) on onnxruntime sessions.

    Built from an export directory, or from a FlowVLA that it exports in memory. Assigning
    `policy.model = new_model` swaps the weights (hot swap) exactly as with FlowPolicy: the new
    weights go into the graphs traced at construction (no new trace), and only a graph whose
    weights changed is rebuilt.
    """

    backend = 'onnxruntime'

    def __init__(self, source: FlowVLA | str | Path, mode: str = 'sde', noise_level: float | None = None,
                 seed: int = 0, device: str = 'cpu', fixed_step: int | None = None, threads: int = 1,
                 sde_noise: str = 'every_step', step_noise_correlation: float = 0.0) -> None:
        check_sampling_mode(mode)  # before the (slow) export
        check_sde_noise(sde_noise)
        check_step_noise_correlation(step_noise_correlation)
        self.providers_wanted = select_providers(device)
        self.threads = threads
        self.export_dir: Path | None = None
        self._model: FlowVLA | None = None
        self._templates: dict[str, onnx.ModelProto] = {}
        self._graphs: dict[str, bytes] = {}
        self._weights: dict[str, dict[str, np.ndarray]] = {}
        self._sessions: _Sessions | None = None
        if isinstance(source, FlowVLA):
            self.model = source
        else:
            self.export_dir = Path(source)
            self._install(_Sessions.from_dir(self.export_dir, self.providers_wanted, threads))
        # The sampler's tensors (and the torch model kept for hot swaps) live on the CPU.
        self._init_sampling(self.config, mode, noise_level, seed, 'cpu', fixed_step, sde_noise,
                            step_noise_correlation=step_noise_correlation)
        log.info('onnxruntime policy on %s (%d intra-op thread(s))', self.provider, threads)

    def _check_compatible(self, new: PolicyConfig) -> None:
        """New weights must keep the robot-facing interface of the running ones."""
        if self._sessions is None:
            return
        old = self._sessions.config
        for name in ('action_dim', 'horizon', 'state_dim', 'camera_names', 'image_size', 'use_language'):
            if getattr(old, name) != getattr(new, name):
                raise OnnxExportError(f'new weights have {name} {getattr(new, name)!r}, '
                                      f'the running policy has {getattr(old, name)!r}')

    def _install(self, sessions: _Sessions) -> None:
        self._check_compatible(sessions.config)
        self._sessions = sessions

    @property
    def config(self) -> PolicyConfig:
        return self._sessions.config

    @property
    def provider(self) -> str:
        """The execution provider that runs the graphs (e.g. 'CPUExecutionProvider')."""
        return self._sessions.providers[0]

    @property
    def model(self) -> FlowVLA | None:
        """The torch model the graphs hold the weights of (None when loaded from an export directory)."""
        return self._model

    @model.setter
    def model(self, model: FlowVLA) -> None:
        # Everything is built before anything is replaced: on failure the running sessions stay.
        self._check_compatible(model.config)
        model = model.to('cpu').eval()
        try:
            if model.config != (self._model.config if self._model is not None else None):
                templates = trace_graphs(model)  # new architecture (or first model): trace once
                current: dict[str, dict[str, np.ndarray]] = {}
            else:
                templates, current = self._templates, self._weights
            weights = _graph_weights(model)
            graphs = {name: self._graphs[name] if name in current and _same(current[name], weights[name])
                      else _finalize(templates[name], weights[name]) for name in GRAPH_FILES}
            stats = {k: v.detach().cpu().clone() for k, v in model.normalizer.state_dict().items()}
            sessions = _Sessions(model.config, stats, graphs, self.providers_wanted, self.threads,
                                 model.prefix_encoder.text.tokenizer if model.config.use_language else None)
            diff = self._compare_with_torch(sessions, model)
            if not diff < SWAP_TOLERANCE:
                raise OnnxExportError(f'the rebuilt graphs disagree with torch by {diff:.3g} (> {SWAP_TOLERANCE})')
            self._install(sessions)
        except OnnxExportError:
            raise
        except Exception as err:  # exporter, optimizer and checker raise many types
            raise OnnxExportError(f'cannot build ONNX graphs for the new weights: {err}') from err
        self._model, self._templates, self._graphs, self._weights = model, templates, graphs, weights
        self.export_dir = None

    def encode_prefix(self, observations: Sequence[Observation],
                      sessions: _Sessions | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Validated observations -> (prefix (B, P, d), prefix_pad (B, P)) from the prefix graph."""
        s = sessions or self._sessions
        cfg = s.config
        batch = stack_observations(observations, cfg)
        feed: dict[str, np.ndarray] = {}
        if cfg.state_dim:  # the one place states are normalized for this backend
            feed['state'] = ((batch.state - s.state_mean) / s.state_std).numpy()
        if cfg.camera_names:
            feed['images'] = batch.images.numpy()
        if cfg.use_language:
            feed.update(tokenize(s.tokenizer, batch.instructions, cfg))
        prefix, pad = s.sessions[PREFIX_FILE].run(None, feed)
        return prefix, pad

    @torch.no_grad()
    def infer_batch(self, observations: Sequence[Observation],
                    initial_noise: torch.Tensor | None = None,
                    step_noise: torch.Tensor | None = None,
                    recorded_steps: torch.Tensor | None = None) -> PolicyOutput:
        """Validates every observation (ObservationError on bad input) and samples one chunk each
        (initial_noise, step_noise, recorded_steps: as FlowPolicy.infer_batch)."""
        s = self._sessions  # one set of weights per batch, even if a swap happens meanwhile
        cfg = s.config
        prefix, pad = self.encode_prefix(observations, s)  # computed once, reused by all K steps
        velocity = s.sessions[VELOCITY_FILE]

        def v(x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
            out = velocity.run(None, {'x': x.numpy(), 'tau': tau.numpy(), 'prefix': prefix, 'prefix_pad': pad})
            return torch.from_numpy(out[0])

        x_final, trace = self._sample(v, cfg, prefix.shape[0], initial_noise, step_noise, recorded_steps)
        chunks = x_final * s.action_std + s.action_mean  # the one place actions are de-normalized
        return PolicyOutput(chunks=chunks.numpy(), trace=trace)

    @torch.no_grad()
    def _compare_with_torch(self, sessions: _Sessions, model: FlowVLA) -> float:
        """Max |onnxruntime - torch| of prefix and velocity on probe inputs (relative): new weights are
        only installed when the graphs really compute the model (a robot must not act on anything else)."""
        obs = probe_observations(model.config, 2)
        prefix, pad = self.encode_prefix(obs, sessions)
        ref = model.encode_prefix(stack_observations(obs, model.config))
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, model.config.horizon, model.config.action_dim, generator=g)
        tau = torch.tensor([1.0, 0.5])
        v = sessions.sessions[VELOCITY_FILE].run(None, {'x': x.numpy(), 'tau': tau.numpy(), 'prefix': prefix,
                                                       'prefix_pad': pad})[0]
        v_ref = model.velocity(x, tau, ref).numpy()
        # Relative to the outputs' scale (at least 1), so wide pretrained encoders are judged alike.
        return max(float(np.abs(prefix - ref[0].numpy()).max()) / max(1.0, float(np.abs(ref[0]).max())),
                   float(np.abs(v - v_ref).max()) / max(1.0, float(np.abs(v_ref).max())))


def probe_observations(cfg: PolicyConfig, n: int, seed: int = 0) -> list[Observation]:
    """`n` random valid observations for `cfg`, instructions of different lengths."""
    rng = np.random.default_rng(seed)
    words = ['pick', 'up', 'the', 'red', 'cube', 'and', 'lift', 'it']
    return [Observation(
        state=rng.normal(size=cfg.state_dim).astype(np.float32) if cfg.state_dim else None,
        images={c: rng.integers(0, 256, (cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
                for c in cfg.camera_names},
        instruction=' '.join(words[:1 + i % len(words)])) for i in range(n)]


def verify_export(export_dir: str | Path, checkpoint: str | Path, batch: int = 3) -> dict[str, Any]:
    """onnx.checker on the written graphs, then torch vs onnxruntime ODE chunks on probe observations."""
    import onnx

    export_dir = Path(export_dir)
    for name in GRAPH_FILES:
        try:
            onnx.checker.check_model(str(export_dir / name), full_check=True)
        except Exception as err:
            raise OnnxExportError(f'{export_dir / name}: fails onnx.checker ({err})') from err
    model, _ = load_checkpoint(checkpoint)
    onnx_policy = OnnxFlowPolicy(export_dir, mode='ode')
    obs = probe_observations(model.config, batch)
    reference = FlowPolicy(model, mode='ode').infer_batch(obs).chunks
    _, header, _ = read_manifest(export_dir)
    return {'provider': onnx_policy.provider, 'weights_version': int(header['weights_version']),
            'checked_by': 'onnx.checker (full_check)',
            'ode_max_abs_diff_vs_torch': float(np.abs(onnx_policy.infer_batch(obs).chunks - reference).max()),
            'files': {p.name: p.stat().st_size for p in sorted(export_dir.iterdir())}}


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def make_policy(source: FlowVLA | str | Path, backend: str = 'torch', mode: str = 'sde',
                noise_level: float | None = None, seed: int = 0, device: str = 'cpu',
                fixed_step: int | None = None, threads: int = 1,
                sde_noise: str = 'every_step', step_noise_correlation: float = 0.0,
                cuda_graph: bool = False) -> FlowPolicy | OnnxFlowPolicy:
    """A policy on `backend`: 'torch' (FlowPolicy) or 'onnxruntime' (OnnxFlowPolicy).

    `source`: a policy backend (FlowVLA, SmolVLABackend), a checkpoint directory, or (onnxruntime only)
    an export directory.
    `device`: torch device, or for onnxruntime 'cpu' / 'cuda[:N]' / 'auto' (execution provider).
    `cuda_graph`: torch backend, ODE on CUDA: replay each chunk's solve from a CUDA graph.
    """
    if backend not in BACKENDS:
        raise ValueError(f'backend must be one of {BACKENDS}, got {backend!r}')
    kwargs = dict(mode=mode, noise_level=noise_level, seed=seed, device=device, fixed_step=fixed_step,
                  sde_noise=sde_noise, step_noise_correlation=step_noise_correlation)
    if backend == 'onnxruntime':
        if cuda_graph:
            raise ValueError('cuda_graph is a torch-backend option (onnxruntime plans its own CUDA execution)')
        if not isinstance(source, nn.Module) and (Path(source) / MANIFEST_FILE).is_file():
            return OnnxFlowPolicy(source, threads=threads, **kwargs)
        model = source if isinstance(source, nn.Module) else load_checkpoint(source)[0]
        if not isinstance(model, FlowVLA):  # the graphs are FlowVLA's prefix encoder and action expert
            raise OnnxExportError(f'the onnxruntime backend runs FlowVLA checkpoints only, not '
                                  f'{getattr(model, "kind", type(model).__name__)}: use the torch backend')
        return OnnxFlowPolicy(model, threads=threads, **kwargs)
    model = source if isinstance(source, nn.Module) else load_checkpoint(source, device=device)[0]
    return FlowPolicy(model, cuda_graph=cuda_graph, **kwargs)


def describe_backend(policy: FlowPolicy | OnnxFlowPolicy) -> str:
    """'torch on cpu' / 'onnxruntime on CPUExecutionProvider', for start-up logs."""
    if isinstance(policy, OnnxFlowPolicy):
        return f'onnxruntime on {policy.provider}'
    return f'torch on {policy.device}'
