"""The transformer (`transformer`), the fused head and cross-entropy (`ops`), LoRA adapters (`lora`)."""
