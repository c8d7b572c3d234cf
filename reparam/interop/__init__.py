"""Interoperability with other libraries' adapter formats.

  peft        export(plan, frozen, trainable, directory) / load(plan, frozen, directory): Hugging Face PEFT
              adapter directories (adapter_config.json + adapter_model.safetensors) for LoRA, rsLoRA, DoRA,
              PiSSA (export), VeRA and LoKr
"""
from reparam.interop import peft

__all__ = ["peft"]
