"""hf_wsvd with the rest of the Hugging Face stack: the model type registered with the Auto classes
(``autoconfig``), checkpoint contents (``checkpoint``), model cards (``card``), the Hub (``hub``),
dense export (``export``), peft LoRA (``peft_lora``), distillation with the Trainer (``healing``)
and weight-only quantization (``quantization``)."""
