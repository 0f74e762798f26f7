"""all-MiniLM-L6-v2 in numpy and the standard library, for the example workload.

The workload container has only python3 and python3-numpy, so the safetensors reader, the
BERT WordPiece tokenizer and the encoder's forward pass are written out here.
"""
