"""HF checkpoint interop: `load_hf` (config.json + safetensors → CausalLM) and `save_hf` (the reverse).

Both work on plain files (json + `safetensors` with numpy), so neither imports transformers or torch. Tensors are
read lazily from memory-mapped files (`safe_open(framework="numpy")`), slice by slice when a sharding is given.

Name mapping (our NNX path → HF tensor; `kernel`s are stored transposed, [in,out] here vs [out,in] in torch). The
decoder blocks are stacked: our `layers/...` parameter has a leading [L] axis whose slice i is HF's block i:

    embed/embedding                          model.embed_tokens.weight
    layers/self_attn/<x>_proj/kernel [i]     model.layers.<i>.self_attn.<x>_proj.weight   (x ∈ q,k,v,o; ᵀ)
    layers/self_attn/<x>_proj/bias [i]       model.layers.<i>.self_attn.<x>_proj.bias
    layers/mlp/<y>_proj/kernel [i]           model.layers.<i>.mlp.<y>_proj.weight         (y ∈ gate,up,down; ᵀ)
    layers/<norm>/weight [i]                 model.layers.<i>.<norm>.weight
    norm/weight                              model.norm.weight
    lm_head/weight                           lm_head.weight                               (untied only)
"""

from __future__ import annotations

import contextlib
import functools
import json
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from capo_jax.models.config import ModelConfig
from capo_jax.models.decoder import CausalLM

_SINGLE_FILE = "model.safetensors"
_INDEX_FILE = "model.safetensors.index.json"
# Buffers some older checkpoints carry that are recomputed here rather than loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

ShardingSpec = jax.sharding.Sharding | Callable[[tuple], jax.sharding.Sharding | None] | None


def _is_stacked(path: tuple) -> bool:
  """Whether an NNX parameter path of `CausalLM` is a decoder-block parameter (leading [L] axis)."""
  return str(path[0]) == "layers"


def hf_name(path: tuple, layer: int | None = None) -> tuple[str, bool]:
  """(HF tensor name, stored transposed?) for an NNX parameter path of `CausalLM`.

  A decoder-block path (`('layers', 'self_attn', 'q_proj', 'kernel')`) names a stacked [L, ...] parameter: `layer`
  picks the block, e.g. `model.layers.3.self_attn.q_proj.weight` for layer=3.

  Raises:
    ValueError: `layer` is missing for a block parameter, or given for any other.
  """
  keys = [str(k) for k in path]
  if _is_stacked(path) != (layer is not None):
    raise ValueError(f"hf_name({'/'.join(keys)}): pass layer=<block index> exactly for the stacked 'layers/...' "
                     f"parameters; got layer={layer!r}.")
  if keys == ["embed", "embedding"]:
    return "model.embed_tokens.weight", False
  if keys[0] == "lm_head":
    return "lm_head.weight", False
  transposed = keys[-1] == "kernel"
  if transposed:
    keys[-1] = "weight"
  if layer is not None:
    keys.insert(1, str(int(layer)))
  return "model." + ".".join(keys), transposed


def _hf_names(path: tuple, shape: tuple) -> tuple[list[str], bool, tuple]:
  """(HF names, transposed?, HF shape of one tensor) of a parameter: one name per block for a stacked parameter of
  shape [L, ...], else one name."""
  if _is_stacked(path):
    names = [hf_name(path, i)[0] for i in range(shape[0])]
    transposed, own_shape = hf_name(path, 0)[1], tuple(shape[1:])
  else:
    (name, transposed), own_shape = hf_name(path), tuple(shape)
    names = [name]
  return names, transposed, tuple(reversed(own_shape)) if transposed else own_shape


def _abstract_model(cfg: ModelConfig):
  return nnx.split(nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0))))


def _tensor_files(folder: pathlib.Path) -> dict[str, pathlib.Path]:
  """Map tensor name → safetensors file, from the sharded index or the single file."""
  index = folder / _INDEX_FILE
  if index.exists():
    weight_map = json.loads(index.read_text()).get("weight_map")
    if not isinstance(weight_map, dict):
      raise ValueError(f"{index}: no 'weight_map' dict; is this a safetensors index?")
    missing = sorted({f for f in weight_map.values() if not (folder / f).exists()})
    if missing:
      raise ValueError(f"{index} lists shard files that are not in the folder: {missing}.")
    return {name: folder / f for name, f in weight_map.items()}
  single = folder / _SINGLE_FILE
  if single.exists():
    with safe_open(single, framework="numpy") as f:
      return {name: single for name in f.keys()}
  raise ValueError(f"{folder}: neither {_SINGLE_FILE} nor {_INDEX_FILE} found; load_hf needs safetensors weights "
                   "(convert .bin checkpoints with transformers' save_pretrained(safe_serialization=True)).")


def _resolve_sharding(shardings: ShardingSpec, path: tuple):
  if shardings is None or isinstance(shardings, jax.sharding.Sharding):
    return shardings
  if callable(shardings):
    sharding = shardings(path)
    if sharding is not None and not isinstance(sharding, jax.sharding.Sharding):
      raise TypeError(f"load_hf: shardings({path}) returned {type(sharding).__name__}, expected a "
                      "jax.sharding.Sharding or None.")
    return sharding
  raise TypeError("load_hf: shardings must be None, a jax.sharding.Sharding, or a callable path -> Sharding | None; "
                  f"got {type(shardings).__name__}.")


def _read(tensor_slice, transposed: bool, index: tuple, dtype) -> np.ndarray:
  """Reads the block `index` (in our layout) of an HF tensor from its memory map, converting dtype."""
  hf_index = tuple(reversed(index)) if transposed else index
  block = tensor_slice[hf_index] if hf_index else tensor_slice[:]
  return np.ascontiguousarray(block.T if transposed else block).astype(dtype, copy=False)


def _read_param(tensor_slices: list, stacked: bool, transposed: bool, shape: tuple, index: tuple, dtype) -> np.ndarray:
  """The block `index` of one parameter; for a stacked parameter, index[0] selects blocks (one HF tensor each) and
  the rest is read from each of them."""
  if not stacked:
    return _read(tensor_slices[0], transposed, index, dtype)
  index = index or (slice(None),)
  layers = range(shape[0])[index[0]]
  inner = tuple(index[1:])
  return np.stack([_read(tensor_slices[i], transposed, inner, dtype) for i in layers])


def load_hf(path, *, dtype=None, param_dtype=None, remat: str | None = None,
            shardings: ShardingSpec = None) -> CausalLM:
  """Loads a Qwen2/Llama-family HF checkpoint folder into a `CausalLM`.

  Args:
    path: folder with config.json and model.safetensors, or model.safetensors.index.json with its shards.
    dtype: compute dtype ("float32" | "bfloat16" | "float16"); default "float32".
    param_dtype: parameter storage dtype; default = dtype. Checkpoint tensors are cast to it.
    remat: `ModelConfig.remat` of the loaded model (None: the default).
    shardings: where to place parameters. None: default device; one `jax.sharding.Sharding` for all; or a callable
      `path -> Sharding | None` on NNX paths such as ('layers', 'self_attn', 'q_proj', 'kernel'); a block parameter
      is stacked, [L, in, out] here, so its sharding covers the layer axis first. With a sharding, each device's
      block is read straight from the memory-mapped files (`jax.make_array_from_callback`), one HF tensor per layer.

  Every tensor is checked (present, right shape) before any is read, so a bad folder raises one ValueError that names
  the offending tensors and nothing half-loaded is returned. Extra tensors in the checkpoint are an error too (they
  mean the config does not describe the weights), except `lm_head.weight` of a tied model and RoPE buffers.

  Raises:
    ValueError: missing folder/config.json/weights, unsupported config (model_type, RoPE type, ...), missing,
      mis-shaped or unexpected tensors.
  """
  folder = pathlib.Path(path)
  if not folder.is_dir():
    raise ValueError(f"load_hf: {folder} is not a folder.")
  config_file = folder / "config.json"
  if not config_file.exists():
    raise ValueError(f"load_hf: {folder} has no config.json; expected an HF checkpoint folder.")
  dtype = "float32" if dtype is None else jnp.dtype(dtype).name
  param_dtype = dtype if param_dtype is None else jnp.dtype(param_dtype).name
  overrides = {} if remat is None else {"remat": remat}
  cfg = ModelConfig.from_hf_dict(json.loads(config_file.read_text()), dtype=dtype, param_dtype=param_dtype, **overrides)
  graphdef, abstract_state = _abstract_model(cfg)
  flat = list(nnx.to_flat_state(abstract_state))
  files = _tensor_files(folder)

  with contextlib.ExitStack() as stack:
    handles = {f: stack.enter_context(safe_open(f, framework="numpy")) for f in sorted(set(files.values()))}
    problems, plan, used = [], [], set()
    for nnx_path, variable in flat:
      names, transposed, expected = _hf_names(nnx_path, tuple(variable.shape))
      used.update(names)
      tensor_slices = []
      for name in names:
        if name not in files:
          problems.append(f"missing tensor {name} (expected shape {list(expected)})")
          continue
        tensor_slice = handles[files[name]].get_slice(name)
        shape = tuple(tensor_slice.get_shape())
        if shape != expected:
          problems.append(f"tensor {name} has shape {list(shape)}, config.json implies {list(expected)}")
          continue
        tensor_slices.append(tensor_slice)
      if len(tensor_slices) == len(names):
        plan.append((nnx_path, variable, tensor_slices, transposed))
    ignorable = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    unexpected = sorted(n for n in files
                        if n not in used and n not in ignorable and not n.endswith(_IGNORED_SUFFIXES))
    if unexpected:
      problems.append(f"unexpected tensors not described by config.json: {unexpected[:8]}"
                      + (f" (+{len(unexpected) - 8} more)" if len(unexpected) > 8 else ""))
    if problems:
      raise ValueError(f"load_hf({folder}): checkpoint does not match config.json:\n  - " + "\n  - ".join(problems))

    loaded = []
    for nnx_path, variable, tensor_slices, transposed in plan:
      read = functools.partial(_read_param, tensor_slices, _is_stacked(nnx_path), transposed, tuple(variable.shape),
                               dtype=jnp.dtype(variable.dtype))
      sharding = _resolve_sharding(shardings, nnx_path)
      if sharding is None:
        value = jnp.asarray(read(()))
      else:
        value = jax.make_array_from_callback(tuple(variable.shape), sharding, lambda index, r=read: r(tuple(index)))
      loaded.append((nnx_path, variable.replace(value)))
  return nnx.merge(graphdef, nnx.from_flat_state(loaded))


def save_hf(model: CausalLM, path, *, tokenizer: Any = None, overwrite: bool = False,
            max_shard_bytes: int | None = None) -> pathlib.Path:
  """Writes `model` as an HF checkpoint folder that transformers loads (AutoConfig, Qwen2/LlamaForCausalLM).

  Writes config.json (`ModelConfig.to_hf_dict`), the weights (parameters in their stored dtype, kernels transposed
  back to torch's [out,in], stacked block parameters split into one tensor per layer; no lm_head.weight when tied)
  and, when `tokenizer` is given, its files via `tokenizer.save_pretrained`. The weights go to model.safetensors, or
  with `max_shard_bytes` to HF-style shards model-0000k-of-0000n.safetensors of at most that many bytes each (a
  larger tensor gets a shard of its own) plus model.safetensors.index.json.

  Raises:
    ValueError: `path` exists and is not empty while overwrite=False; max_shard_bytes is not a positive int.
    TypeError: `tokenizer` has no save_pretrained.
  """
  folder = pathlib.Path(path)
  if max_shard_bytes is not None and (not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0):
    raise ValueError(f"save_hf: max_shard_bytes must be a positive int (or None for one file), got "
                     f"{max_shard_bytes!r}.")
  if folder.exists() and not folder.is_dir():
    raise ValueError(f"save_hf: {folder} exists and is not a folder.")
  if folder.exists() and any(folder.iterdir()):
    if not overwrite:
      raise ValueError(f"save_hf: {folder} is not empty; pass overwrite=True to replace its checkpoint.")
    # Weights of an earlier save in the other layout would shadow or outlive the new ones (the index wins on load).
    for stale in [folder / _INDEX_FILE, folder / _SINGLE_FILE, *folder.glob("model-*-of-*.safetensors")]:
      stale.unlink(missing_ok=True)
  if tokenizer is not None and not hasattr(tokenizer, "save_pretrained"):
    raise TypeError(f"save_hf: tokenizer must have save_pretrained (a transformers tokenizer); "
                    f"got {type(tokenizer).__name__}.")
  folder.mkdir(parents=True, exist_ok=True)

  tensors = {}
  for nnx_path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    value = np.asarray(jax.device_get(variable[...]))
    names, transposed, _ = _hf_names(nnx_path, value.shape)
    blocks = list(value) if _is_stacked(nnx_path) else [value]
    for name, block in zip(names, blocks):
      tensors[name] = np.ascontiguousarray(block.T if transposed else block)
  if max_shard_bytes is None:
    save_file(tensors, folder / _SINGLE_FILE, metadata={"format": "pt"})
  else:
    _save_shards(tensors, folder, max_shard_bytes)
  (folder / "config.json").write_text(json.dumps(model.config.to_hf_dict(), indent=2) + "\n")
  if tokenizer is not None:
    tokenizer.save_pretrained(str(folder))
  return folder


def _save_shards(tensors: dict[str, np.ndarray], folder: pathlib.Path, max_shard_bytes: int) -> None:
  """Writes `tensors` into consecutive shards of at most `max_shard_bytes` (in order) and the HF index file."""
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, tensor in tensors.items():
    if shards[-1] and size + tensor.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = tensor
    size += tensor.nbytes
  weight_map = {}
  for k, shard in enumerate(shards):
    file_name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, folder / file_name, metadata={"format": "pt"})
    weight_map.update({name: file_name for name in shard})
  index = {"metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))}, "weight_map": weight_map}
  (folder / _INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
