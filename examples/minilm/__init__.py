"""all-MiniLM-L6-v2 in numpy, for the example workload.

The encoder's forward pass is written out here (the container has no torch); the tokenizer
and the safetensors reader are Hugging Face's ``tokenizers`` and ``safetensors`` (ADR 0017).
"""
