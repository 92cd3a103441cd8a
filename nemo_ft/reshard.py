"""Adapter .nemo files between TP x PP layouts: read the per-rank shards, gather them to the canonical
TP=1 PP=1 adapter with the pure core (nemo_ft.export.gather_adapter), or split that to another layout,
and write NeMo's PEFT .nemo again. Used by export (adapter_tp1.nemo), eval (an adapter trained at TP>1
evaluated at TP=1) and sft (continuing or validating at another layout than the adapter was saved at).

The tensors cross into numpy as float32 (exact for fp32 and bf16) and go back in their own dtype.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from nemo_ft.nemo_archive import NemoArchive, rank_of, write_adapter

_LAYER = re.compile(r"^(model\.decoder\.layers\.)(\d+)(\..*)$")


@dataclass
class Adapter:
    """An adapter .nemo read into the pure core's terms."""
    config: dict
    spec: object           # nemo_ft.export.AdapterSpec
    canonical: dict        # {global key: float32 array}, TP=1 PP=1
    dtypes: dict           # {per-rank key: torch dtype}

    def dtype(self, key: str):
        """The dtype a canonical key was saved with (its per-rank key has a stage-local layer number)."""
        m = _LAYER.match(key)
        if m and self.spec.pp > 1:
            per_stage = self.spec.model.num_layers // self.spec.pp
            key = f"{m.group(1)}{int(m.group(2)) % per_stage}{m.group(3)}"
        return self.dtypes[key]

    def torch_state(self, arrays: dict | None = None) -> dict:
        import torch

        arrays = self.canonical if arrays is None else arrays
        return {k: torch.from_numpy(v.copy()).to(self.dtype(k)) for k, v in arrays.items()}


def read_adapter(path, key: str = "adapter") -> Adapter:
    """Read and gather an adapter .nemo of any layout (InputError/ConfigError naming the file on a problem)."""
    from nemo_ft.errors import ConfigError, InputError
    from nemo_ft.export import AdapterSpec, gather_adapter

    with NemoArchive(path, key=key) as archive:
        config = archive.config()
        tensors = archive.tensors()
    try:
        spec = AdapterSpec.from_nemo_config(config)
    except ConfigError as err:  # a bad value inside the file's own config: name the file
        raise InputError(err.message, path=str(path), key=err.key) from None
    shards = {rank_of(m): {k: t.detach().float().numpy() for k, t in sd.items()} for m, sd in tensors.items()}
    dtypes = {k: t.dtype for sd in tensors.values() for k, t in sd.items()}
    return Adapter(config, spec, gather_adapter(shards, spec), dtypes)


def write_tp1(adapter: Adapter, out) -> Path:
    """The canonical TP=1 PP=1 adapter as NeMo's PEFT .nemo (one root model_weights.ckpt)."""
    conf = dict(adapter.config, tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    return write_adapter(Path(out), conf, adapter.torch_state())


def tp1_path(path, scratch: Path, name: str) -> tuple[Path, bool]:
    """`path` itself when it is already TP=1 PP=1, else its gathered copy in `scratch`; (path, resharded)."""
    with NemoArchive(path) as archive:
        if archive.layout().kind == "single":
            return Path(path), False
    return write_tp1(read_adapter(path), scratch / f"{name}_tp1.nemo"), True
