"""Prints a digest of some of SAELens's own public behaviours, as JSON; run with `--plugin` to import
sae_selfexplain_plugin first. tests/test_sae_lens_peer.py compares the two runs."""

from __future__ import annotations

import copy
import hashlib
import json
import sys
import tempfile

if "--plugin" in sys.argv:
    import sae_selfexplain_plugin  # noqa: F401

import torch
from sae_lens import SAE, JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
from sae_lens.saes.sae import SAEMetadata


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().float().contiguous().numpy().tobytes()).hexdigest()[:16]


out: dict[str, object] = {"plugin": "sae_selfexplain_plugin" in sys.modules}
x = torch.randn(5, 24, generator=torch.Generator().manual_seed(0))
for cls, cfg_cls, kw in [(StandardSAE, StandardSAEConfig, {}), (TopKSAE, TopKSAEConfig, {"k": 3}),
                         (JumpReLUSAE, JumpReLUSAEConfig, {})]:  # fmt: skip
    torch.manual_seed(0)
    meta = SAEMetadata(model_name="gpt2-small", hook_name="blocks.3.hook_resid_pre")
    sae = cls(cfg_cls(d_in=24, d_sae=40, metadata=meta, **kw))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    row: dict[str, object] = {
        "state_dict": sorted(sae.state_dict()),
        "encode": digest(sae.encode(x)),
        "decode": digest(sae.decode(sae.encode(x))),
        "forward": digest(sae(x)),
        "deepcopy": digest(copy.deepcopy(sae)(x)),
        "cfg": sae.cfg.to_dict(),
    }
    with tempfile.TemporaryDirectory() as folder:
        sae.save_model(folder)
        loaded = SAE.load_from_disk(folder)
        row["loaded_type"] = type(loaded).__name__
        row["loaded_forward"] = digest(loaded(x))
        row["loaded_state_dict"] = sorted(loaded.state_dict())
    out[cls.__name__] = row
print(json.dumps(out, sort_keys=True, default=str))
