"""GGUF -> float32 safetensors, one tensor at a time.

transformers' GGUF loader dequantizes every tensor into one state dict and builds the
model from it: the whole float32 model plus the GGUF reader (its memory map and parsed
metadata) are resident together, the peak of a cold-cache run. Here each tensor is
dequantized, renamed and permuted with transformers' own mapping and tensor processor,
written to disk and dropped; the safetensors header is written last (data first into a
sibling file, then header + data into the weights file).
The values are the ones transformers' own loader produces.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch

STREAMED_ARCHS = ("llama",)  # GGUF architectures checked against transformers' conversion


def gguf_architecture(path: Path) -> str | None:
    import gguf

    field = gguf.GGUFReader(path).fields.get("general.architecture")
    return None if field is None else str(field.contents())


def convert(path: Path, folder: Path) -> None:
    """Write ``model.safetensors``, ``config.json`` and ``generation_config.json`` of the GGUF
    model at ``path`` into the existing ``folder`` (float32 weights, tied ones once)."""
    import gguf
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map, load_gguf_checkpoint

    parsed = load_gguf_checkpoint(str(path), return_tensors=False)
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    config.dtype = torch.float32
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    reader = gguf.GGUFReader(path)
    arch = str(reader.fields["general.architecture"].contents())
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=parsed["config"])
    mapping = get_gguf_hf_weights_map(skeleton, processor)
    wanted = set(skeleton.state_dict())
    header: dict[str, dict] = {}
    data_path = folder / ".model.safetensors.data"
    offset = 0
    with open(data_path, "wb") as data:
        for t in reader.tensors:
            result = processor.process(
                weights=gguf.dequantize(t.data, t.tensor_type), name=t.name, tensor_key_mapping=mapping, parsed_parameters=parsed
            )
            if result.name not in mapping or mapping[result.name] not in wanted:
                continue
            arr = np.ascontiguousarray(result.weights, dtype=np.float32)
            data.write(memoryview(arr).cast("B"))
            header[mapping[result.name]] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
            offset += arr.nbytes
            del arr, result
    del reader
    missing = sorted(k for k in wanted - set(header) if not _tied(skeleton, k))
    if missing:
        data_path.unlink()
        raise ValueError(f"GGUF file {path.name} lacks tensors {missing[:4]}")
    _write_safetensors(folder / "model.safetensors", header, data_path)
    config.architectures = [type(skeleton).__name__]
    config.save_pretrained(folder)
    GenerationConfig.from_model_config(config).save_pretrained(folder)


def _tied(model, key: str) -> bool:
    return key == "lm_head.weight" and bool(getattr(model.config, "tie_word_embeddings", False))


def _write_safetensors(path: Path, header: dict, data_path: Path) -> None:
    """header (8-byte length, JSON padded to 8 bytes) + the data file's bytes, then drop it."""
    meta = {"__metadata__": {"format": "pt"}, **dict(sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]))}
    blob = json.dumps(meta, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as out, open(data_path, "rb") as data:
        out.write(struct.pack("<Q", len(blob)))
        out.write(blob)
        while chunk := data.read(16 << 20):
            out.write(chunk)
    data_path.unlink()
