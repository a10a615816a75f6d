"""The Hub set: the files that `save_pretrained` copies beside the weights, so that `trust_remote_code=True` loads
the model where only transformers is installed. Flat inside, each file importing only torch, transformers, the
standard library and its neighbours here (PIL and numpy for images, as transformers' image processors do)."""
