"""NESTOR-DS: a DeepSpeed trainer for NESTOR, a nested mixture-of-experts neural operator for PDEs."""


def load_pretrained(path, **kw):
    """Eval-mode model from an exported .safetensors file or a DeepSpeed checkpoint (lazy: no heavy imports)."""
    from nestor_ds.checkpoint.load import load_pretrained as _load

    return _load(path, **kw)
